//! Image recipes: what goes into a base image (`images/NAME.toml`), parsed and validated,
//! and the hash that names the built image in the cache.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::arch::Arch;
use crate::size::parse_size;

/// Bumped whenever the builder changes what it produces from the same recipe, so that
/// cached images from an older builder are not reused.
pub const BUILDER_VERSION: u32 = 1;

/// The recipe shipped with runner (used when no project recipe of that name exists).
pub const BUILTIN_RECIPES: &[(&str, &str)] =
    &[("debian-13", include_str!("../../../images/debian-13.toml"))];

/// Packages every image gets, whatever the recipe says. `?essential` is apt's pattern for
/// Debian's Essential set (what maintainer scripts may assume).
pub const REQUIRED_PACKAGES: &[&str] = &[
    "?essential",
    "qemu-guest-agent",
    "busybox-static",
    "tini",
    "util-linux",
    "mount",
    "procps",
];

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("unknown image '{0}': no images/{0}.toml in this project and no built-in recipe of that name (built-in: debian-13)")]
    Unknown(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: String,
    #[serde(default)]
    description: String,
    distribution: String,
    mirror: String,
    #[serde(default = "default_disk_size")]
    disk_size: String,
    #[serde(default)]
    packages: Vec<String>,
}

fn default_disk_size() -> String {
    "4G".into()
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    pub distribution: String,
    pub mirror: String,
    pub disk_size_bytes: u64,
    pub packages: Vec<String>,
    /// Where it came from ("built-in" or a path), for messages.
    pub origin: String,
}

impl Recipe {
    /// Parses recipe TOML; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Recipe, RecipeError> {
        let invalid = |message: String| RecipeError::Invalid {
            path: origin.into(),
            message,
        };
        let raw: RawRecipe = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    format!(
                        "line {}: ",
                        before.bytes().filter(|&b| b == b'\n').count() + 1
                    )
                })
                .unwrap_or_default();
            invalid(format!("{at}{}", e.message().replace('\n', "; ")))
        })?;
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(format!(
                "name '{}' must be letters, digits, '-', '_' or '.'",
                raw.name
            )));
        }
        if !raw.mirror.starts_with("http://") && !raw.mirror.starts_with("https://") {
            return Err(invalid(format!(
                "mirror '{}' must be an http(s) URL",
                raw.mirror
            )));
        }
        let disk_size_bytes = parse_size(&raw.disk_size)
            .ok()
            .filter(|&b| b >= 512 << 20)
            .ok_or_else(|| {
                invalid(format!(
                    "disk_size '{}' must be a size of at least 512M, like \"4G\"",
                    raw.disk_size
                ))
            })?;
        for p in &raw.packages {
            if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c == ',') {
                return Err(invalid(format!("package name '{p}' is not valid")));
            }
        }
        Ok(Recipe {
            name: raw.name,
            description: raw.description,
            distribution: raw.distribution,
            mirror: raw.mirror,
            disk_size_bytes,
            packages: raw.packages,
            origin: origin.into(),
        })
    }

    /// Finds recipe `name`: `project_dir/images/NAME.toml` first, then the built-in ones.
    pub fn find(name: &str, project_dir: Option<&Path>) -> Result<Recipe, RecipeError> {
        if let Some(dir) = project_dir {
            let path = dir.join("images").join(format!("{name}.toml"));
            if path.is_file() {
                return Recipe::load(&path);
            }
        }
        BUILTIN_RECIPES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, text)| Recipe::parse(&format!("built-in recipe {n}"), text))
            .unwrap_or_else(|| Err(RecipeError::Unknown(name.into())))
    }

    /// Reads and parses a recipe file.
    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.into(),
            source,
        })?;
        Recipe::parse(&path.display().to_string(), &text)
    }

    /// The content hash naming the image built from this recipe for `arch`. The mirror is
    /// left out on purpose: any mirror serves the same signed packages.
    pub fn hash(&self, arch: Arch, init_script: &str) -> String {
        let mut h = Sha256::new();
        h.update(format!("builder={BUILDER_VERSION}\narch={arch}\n"));
        h.update(&self.name);
        h.update(&self.distribution);
        h.update(self.disk_size_bytes.to_le_bytes());
        for p in &self.packages {
            h.update(p);
            h.update(b"\n");
        }
        h.update(init_script);
        hex(&h.finalize())[..16].to_string()
    }

    /// Every package to install for `arch`.
    pub fn all_packages(&self, arch: Arch) -> Vec<String> {
        let mut all: Vec<String> = REQUIRED_PACKAGES.iter().map(|s| s.to_string()).collect();
        all.push(arch.kernel_package().into());
        for p in &self.packages {
            if !all.contains(p) {
                all.push(p.clone());
            }
        }
        all
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_recipe_parses() {
        let r = Recipe::find("debian-13", None).unwrap();
        assert_eq!(r.distribution, "trixie");
        assert_eq!(r.disk_size_bytes, 4 << 30);
        let all = r.all_packages(Arch::Riscv64);
        assert!(all.contains(&"linux-image-riscv64".to_string()));
        assert!(all.contains(&"qemu-guest-agent".to_string()));
    }

    #[test]
    fn hash_depends_on_arch_and_packages_not_mirror() {
        let a = Recipe::find("debian-13", None).unwrap();
        let mut b = a.clone();
        b.mirror = "http://mirror.example/debian".into();
        assert_eq!(a.hash(Arch::Riscv64, "init"), b.hash(Arch::Riscv64, "init"));
        assert_ne!(a.hash(Arch::Riscv64, "init"), a.hash(Arch::Aarch64, "init"));
        assert_ne!(
            a.hash(Arch::Riscv64, "init"),
            a.hash(Arch::Riscv64, "init2")
        );
        b.packages.push("python3".into());
        assert_ne!(a.hash(Arch::Riscv64, "init"), b.hash(Arch::Riscv64, "init"));
    }

    #[test]
    fn bad_recipes_say_what_is_wrong() {
        // (recipe text, expected fragment of the error)
        let base = "name='x'\ndistribution='trixie'\nmirror='http://deb.debian.org/debian'\n";
        let cases = [
            (format!("{base}disk_size='10M'"), "disk_size"),
            (format!("{base}packages=['a b']"), "package name"),
            (format!("{base}colour='red'"), "unknown field"),
            (
                "name='x'\ndistribution='trixie'\nmirror='ftp://x'".to_string(),
                "mirror",
            ),
            (
                "name='bad name'\ndistribution='t'\nmirror='http://x'".to_string(),
                "name",
            ),
            ("name = [".to_string(), "line 1"),
        ];
        for (text, want) in cases {
            let err = Recipe::parse("test.toml", &text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn unknown_image_names_the_builtin_ones() {
        let err = Recipe::find("fedora", None).unwrap_err().to_string();
        assert!(err.contains("fedora") && err.contains("debian-13"), "{err}");
    }

    #[test]
    fn sizes() {}
}
