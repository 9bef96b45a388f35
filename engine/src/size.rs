//! Sizes as people write them ("512M", "4G") and the guest-memory rule built on them: one
//! parser for the engine's recipes and the runner's suite files, configs and flags.

use std::fmt;

/// Why a string is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("invalid size '{0}'; use e.g. \"512M\" (suffixes: K, M, G, T)")]
    Invalid(String),
    #[error("size '{0}' is too large")]
    TooLarge(String),
}

/// Parses a size such as "512M", "1G", "1024K" or "2GiB" (binary units, any case); a plain
/// integer is bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    let (number, suffix) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let invalid = || SizeError::Invalid(s.to_string());
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let suffix = suffix.trim().to_ascii_uppercase();
    let shift = match suffix.strip_suffix("IB").unwrap_or(&suffix) {
        // A bare "iB" is not a unit, so "" counts only when there was no suffix at all.
        "" if suffix.is_empty() => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

/// Guest memory: a whole number of MiB between [`Memory::MIN_MIB`] and [`Memory::MAX_MIB`].
/// Every place that takes a memory size (suite file, GitLab runner config, matrix file, CLI)
/// goes through here, so they all accept and refuse the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Memory {
    mib: u32,
}

/// Why a size is not a guest memory size; the caller names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("must be a whole number of MiB in 128M..=64G")]
    OutOfRange,
}

impl Memory {
    /// Below this a Debian guest does not boot reliably.
    pub const MIN_MIB: u32 = 128;
    /// More than any host this runs on has to give one VM.
    pub const MAX_MIB: u32 = 64 * 1024;

    /// From a size string ("512M", "2G"; a plain number is bytes).
    pub fn parse(s: &str) -> Result<Memory, MemoryError> {
        Memory::from_bytes(parse_size(s)?)
    }

    /// From a byte count: a whole number of MiB in range, nothing rounded.
    pub fn from_bytes(bytes: u64) -> Result<Memory, MemoryError> {
        const MIB: u64 = 1 << 20;
        let mib = bytes / MIB;
        if !bytes.is_multiple_of(MIB)
            || !(Memory::MIN_MIB as u64..=Memory::MAX_MIB as u64).contains(&mib)
        {
            return Err(MemoryError::OutOfRange);
        }
        Ok(Memory { mib: mib as u32 })
    }

    pub fn mib(self) -> u32 {
        self.mib
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}M", self.mib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_cases() {
        // (input, bytes or None for an error)
        #[rustfmt::skip]
        let cases = [
            ("512", Some(512)), ("0", Some(0)), // a plain integer is bytes; callers reject zero
            ("1024K", Some(1 << 20)), ("512M", Some(512 << 20)), ("1G", Some(1 << 30)), ("1T", Some(1 << 40)),
            ("1g", Some(1 << 30)), ("2GiB", Some(2 << 30)), // any case, and the explicit binary spelling
            (" 3 M ", Some(3 << 20)), // spaces around and inside are fine
            ("", None), ("M", None), ("1.5G", None), ("-1G", None), ("12X", None), // not sizes
            ("x", None), ("4GB", None), // "GB" is not a binary unit
            ("1iB", None),            // "iB" alone is not a unit
            ("99999999999G", None),   // overflows u64
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input).ok(), want, "{input:?}");
        }
        assert_eq!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge("99999999999T".into()))
        );
    }

    #[test]
    fn memory_cases() {
        // (input, MiB or the error)
        #[rustfmt::skip]
        let cases = [
            ("128M", Ok(128)), ("1G", Ok(1024)), ("64G", Ok(65536)), ("1536M", Ok(1536)), // in range
            ("127M", Err(MemoryError::OutOfRange)), ("65537M", Err(MemoryError::OutOfRange)), // out
            ("1048577K", Err(MemoryError::OutOfRange)), // 1 GiB + 1 KiB: not whole MiB, not rounded
            ("134217728", Ok(128)),                     // a plain number is bytes
            ("lots", Err(MemoryError::Size(SizeError::Invalid("lots".into())))),
        ];
        for (input, want) in cases {
            assert_eq!(Memory::parse(input).map(Memory::mib), want, "{input:?}");
        }
    }
}
