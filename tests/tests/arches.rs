//! One real-VM test per architecture beyond the first three (armhf, ppc64el, s390x, i386,
//! mips64el, mipsel): the guest is the architecture asked for (uname, dpkg, byte order, word
//! size), a step's exit code and live output come through, a guest JUnit file is merged, an
//! artifact is copied back, and where the architecture resumes from saved states a second run
//! really resumed (it fails if that run booted cold).
//!
//! The expectations are written here, independently of the engine's architecture table, so a
//! wrong row (machine, kernel, default image) fails a test instead of being echoed back.

use e2e::{runner, vm_start_kind, RESUMED};

/// What a guest of one architecture must report about itself.
struct Expect {
    arch: &'static str,
    uname: &'static str,
    debian: &'static str,
    /// The bytes 01 00 read as a native 16-bit word: 1 little-endian, 256 big-endian.
    word: &'static str,
    long_bit: &'static str,
    /// Whether the second job must resume from the state the first one saved.
    resumes: bool,
}

const SUITE: &str = r#"
[[suite]]
name = "facts"
junit = ["out/*.xml"]
artifacts = ["out/facts.txt"]

  [[suite.step]]
  name = "facts"
  run = '''
mkdir -p out
{
  echo "uname=$(uname -m)"
  echo "dpkg=$(dpkg --print-architecture)"
  echo "word=$(printf '\001\000' | od -An -tu2 | tr -d ' ')"
  echo "long_bit=$(getconf LONG_BIT)"
} | tee out/facts.txt
cat > out/guest.xml <<XML
<testsuite name="guest-$RUNNER_ARCH" tests="2" failures="1">
  <testcase classname="guest" name="passes"/>
  <testcase classname="guest" name="fails"><failure message="on purpose">trace</failure></testcase>
</testsuite>
XML
'''

  [[suite.step]]
  name = "exit code"
  run = "echo about to exit 7; exit 7"
  allow_failure = true
"#;

fn check(e: Expect) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("runner.toml"), SUITE).unwrap();
    let junit = dir.path().join("junit.xml");
    let r = runner(
        dir.path(),
        &[
            "test",
            "--arch",
            e.arch,
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    // The guest JUnit carries a failure, so the suite fails (exit 1), not an infrastructure
    // error (which would be 3 or more).
    assert_eq!(r.code, 1, "{r}");
    // Live output of the guest, as it ran.
    for line in [
        format!("uname={}", e.uname),
        format!("dpkg={}", e.debian),
        format!("word={}", e.word),
        format!("long_bit={}", e.long_bit),
        "about to exit 7".to_string(),
    ] {
        assert!(r.stdout.lines().any(|l| l == line), "missing {line:?}: {r}");
    }
    // The artifact came back with the same facts.
    let facts = dir
        .path()
        .join(format!("runner-out/facts-{}/out/facts.txt", e.arch));
    let text = std::fs::read_to_string(&facts).unwrap_or_else(|err| panic!("{facts:?}: {err}"));
    assert!(text.contains(&format!("dpkg={}\n", e.debian)), "{text}");
    // The report: the step's exit code, the guest's suite merged with its failure.
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("exit 7"), "{xml}");
    assert!(xml.contains(&format!("guest-{}", e.arch)), "{xml}");
    assert!(xml.contains("on purpose"), "{xml}");
    assert!(
        xml.contains(&format!("name=\"arch\" value=\"{}\"", e.arch)),
        "{xml}"
    );

    // A second job: resumed from the state the first saved, where the arch supports it.
    let again = runner(dir.path(), &["test", "--arch", e.arch, "--", "uname", "-m"]);
    assert_eq!(again.code, 0, "{again}");
    assert!(again.stdout.contains(e.uname), "{again}");
    let kind = vm_start_kind(&again.stderr);
    if e.resumes {
        assert_eq!(kind, Some(RESUMED), "{again}");
    } else {
        assert_eq!(kind, Some("cold boot"), "{again}");
    }
}

#[test]
fn armhf_is_a_32_bit_arm_guest() {
    check(Expect {
        arch: "armhf",
        uname: "armv7l",
        debian: "armhf",
        word: "1",
        long_bit: "32",
        resumes: true,
    });
}

#[test]
fn ppc64el_is_a_little_endian_power_guest() {
    check(Expect {
        arch: "ppc64el",
        uname: "ppc64le",
        debian: "ppc64el",
        word: "1",
        long_bit: "64",
        resumes: false,
    });
}

#[test]
fn s390x_is_a_big_endian_guest() {
    check(Expect {
        arch: "s390x",
        uname: "s390x",
        debian: "s390x",
        word: "256",
        long_bit: "64",
        resumes: true,
    });
}

#[test]
fn i386_is_a_32_bit_x86_guest() {
    check(Expect {
        arch: "i386",
        uname: "i686",
        debian: "i386",
        word: "1",
        long_bit: "32",
        resumes: true,
    });
}

#[test]
fn mips64el_is_a_64_bit_mips_guest() {
    check(Expect {
        arch: "mips64el",
        uname: "mips64",
        debian: "mips64el",
        word: "1",
        long_bit: "64",
        resumes: true,
    });
}

#[test]
fn mipsel_is_a_32_bit_mips_guest() {
    check(Expect {
        arch: "mipsel",
        uname: "mips",
        debian: "mipsel",
        word: "1",
        long_bit: "32",
        resumes: true,
    });
}
