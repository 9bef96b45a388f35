//! Image recipes: what goes into a base image (`NAME.toml`), where a name is looked up
//! (built-in, the operator's recipe directory, a repository's `images/`), the validation that
//! keeps a recipe from steering the host (it is built on the host by mmdebstrap), and the hash
//! that names the built image in the cache.

use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::arch::Arch;
use crate::size::parse_size;

/// Bumped whenever the builder changes what it produces from the same recipe, so that
/// cached images from an older builder are not reused. 2: extraction under fakeroot, and the
/// hash covers the recipe's origin and mirror. 3: merged /usr set up before extraction, the
/// virtio transport and console modules in the initramfs (bookworm kernels).
pub const BUILDER_VERSION: u32 = 3;

/// The recipes shipped with runner.
pub const BUILTIN_RECIPES: &[(&str, &str)] = &[
    ("debian-13", include_str!("../../../images/debian-13.toml")),
    ("debian-12", include_str!("../../../images/debian-12.toml")),
];

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

/// The largest root disk a recipe may ask for: the raw disk is written out in full on the
/// host during the build.
pub const MAX_DISK_SIZE: u64 = 64 << 30;
/// The smallest: Debian's Essential set plus a kernel do not fit in less.
pub const MIN_DISK_SIZE: u64 = 512 << 20;
/// The largest recipe file read.
const MAX_RECIPE_BYTES: u64 = 64 << 10;
/// The longest image name (it becomes part of a directory name).
const MAX_NAME_LEN: usize = 64;

/// An image's name: a plain word, never a path (`[A-Za-z0-9][A-Za-z0-9._-]*`, not ending in
/// `.toml`). Names come from runner.toml, job payloads and the command line; only a name is
/// ever looked up, in the places a [`RecipeLookup`] allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct ImageName(String);

impl TryFrom<String> for ImageName {
    type Error = InvalidImageName;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Why a string is not an [`ImageName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{}' is not an image name: use letters, digits, '.', '_' and '-' (at most {MAX_NAME_LEN}, starting with a letter or digit, not ending in .toml) — images are names, never paths", .0.escape_debug())]
pub struct InvalidImageName(pub String);

impl ImageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ImageName {
    type Err = InvalidImageName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if first_ok && rest_ok && s.len() <= MAX_NAME_LEN && !s.ends_with(".toml") {
            Ok(ImageName(s.to_string()))
        } else {
            Err(InvalidImageName(s.to_string()))
        }
    }
}

impl std::fmt::Display for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for ImageName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Where a recipe came from. Part of the image's hash: a recipe from a repository never
/// shares a cache entry with a built-in or operator recipe of the same name and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipeOrigin {
    BuiltIn,
    /// A file in the operator's recipe directory (trusted, from the operator's config).
    Operator(PathBuf),
    /// A file in a repository's `images/` (only for `runner test` on the user's machine).
    Repository(PathBuf),
    /// Parsed from text by a test or tool; never looked up.
    Inline(String),
}

impl RecipeOrigin {
    /// The word that goes into the hash and the manifest.
    pub fn kind(&self) -> &'static str {
        match self {
            RecipeOrigin::BuiltIn => "built-in",
            RecipeOrigin::Operator(_) => "operator",
            RecipeOrigin::Repository(_) => "repository",
            RecipeOrigin::Inline(_) => "inline",
        }
    }
}

impl std::fmt::Display for RecipeOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecipeOrigin::BuiltIn => f.write_str("built-in recipe"),
            RecipeOrigin::Operator(p) => write!(f, "{}", p.display()),
            RecipeOrigin::Repository(p) => write!(f, "{}", p.display()),
            RecipeOrigin::Inline(what) => f.write_str(what),
        }
    }
}

/// Whether a repository's own `images/NAME.toml` may be used. A recipe is built on the host
/// (mmdebstrap as the user running runner), so only `runner test` on the user's own machine
/// honours it; services pass `Refused`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryRecipes {
    Refused,
    /// Look in `DIR/images/`.
    Honoured(PathBuf),
}

/// Where image names are looked up, in this order: the repository's `images/` (when
/// honoured), the operator's recipe directory, the built-in recipes. There is no default:
/// every caller states the repository policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeLookup {
    /// The operator's trusted recipe directory (`NAME.toml` files), if configured.
    pub operator_dir: Option<PathBuf>,
    pub repository: RepositoryRecipes,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error(transparent)]
    Name(#[from] InvalidImageName),
    #[error("cannot read recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {origin}: {message}")]
    Invalid {
        origin: RecipeOrigin,
        message: String,
    },
    #[error("unknown image '{name}': {searched}")]
    Unknown { name: ImageName, searched: String },
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
    pub name: ImageName,
    pub description: String,
    /// A plain suite name (`[a-z0-9][a-z0-9.-]*`).
    pub distribution: String,
    /// An http(s) URL without whitespace or control characters.
    pub mirror: String,
    pub disk_size_bytes: u64,
    /// Plain Debian package names.
    pub packages: Vec<String>,
    pub origin: RecipeOrigin,
}

impl RecipeLookup {
    /// The recipe for `name` from the first place that has one.
    pub fn find(&self, name: &ImageName) -> Result<Recipe, RecipeError> {
        if let RepositoryRecipes::Honoured(dir) = &self.repository {
            let path = dir.join("images").join(format!("{name}.toml"));
            if path.exists() {
                return Recipe::load(name, RecipeOrigin::Repository(path));
            }
        }
        if let Some(dir) = &self.operator_dir {
            let path = dir.join(format!("{name}.toml"));
            if path.exists() {
                return Recipe::load(name, RecipeOrigin::Operator(path));
            }
        }
        if let Some((_, text)) = BUILTIN_RECIPES.iter().find(|(n, _)| *n == name.as_str()) {
            return Recipe::parse(RecipeOrigin::BuiltIn, text);
        }
        let builtin: Vec<&str> = BUILTIN_RECIPES.iter().map(|(n, _)| *n).collect();
        let mut searched = Vec::new();
        match &self.repository {
            RepositoryRecipes::Honoured(dir) => searched.push(format!(
                "no {}",
                dir.join("images").join(format!("{name}.toml")).display()
            )),
            RepositoryRecipes::Refused => {
                searched.push("a repository's own images/ recipes are not used here".to_string())
            }
        }
        if let Some(dir) = &self.operator_dir {
            searched.push(format!("no {}", dir.join(format!("{name}.toml")).display()));
        }
        searched.push(format!(
            "no built-in recipe of that name (built-in: {})",
            builtin.join(", ")
        ));
        Err(RecipeError::Unknown {
            name: name.clone(),
            searched: searched.join("; "),
        })
    }
}

impl Recipe {
    /// Parses and validates recipe TOML.
    pub fn parse(origin: RecipeOrigin, text: &str) -> Result<Recipe, RecipeError> {
        let invalid = |message: String| RecipeError::Invalid {
            origin: origin.clone(),
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
        let name: ImageName = raw
            .name
            .parse()
            .map_err(|e: InvalidImageName| invalid(format!("name: {e}")))?;
        if !is_distribution(&raw.distribution) {
            return Err(invalid(format!(
                "distribution '{}' must be a plain suite name like \"trixie\" (a-z, 0-9, '.', '-')",
                raw.distribution.escape_debug()
            )));
        }
        check_mirror(&raw.mirror).map_err(invalid)?;
        let disk_size_bytes = parse_size(&raw.disk_size)
            .ok()
            .filter(|b| (MIN_DISK_SIZE..=MAX_DISK_SIZE).contains(b))
            .ok_or_else(|| {
                invalid(format!(
                    "disk_size '{}' must be a size from 512M to 64G, like \"4G\"",
                    raw.disk_size.escape_debug()
                ))
            })?;
        if let Some(p) = raw.packages.iter().find(|p| !is_package_name(p)) {
            return Err(invalid(format!(
                "package '{}' is not a Debian package name (a-z, 0-9, '+', '-', '.'; at least two characters)",
                p.escape_debug()
            )));
        }
        Ok(Recipe {
            name,
            description: raw.description,
            distribution: raw.distribution,
            mirror: raw.mirror,
            disk_size_bytes,
            packages: raw.packages,
            origin,
        })
    }

    /// Reads a recipe file (a regular file of at most 64 KiB) whose name must match `name`.
    fn load(name: &ImageName, origin: RecipeOrigin) -> Result<Recipe, RecipeError> {
        let path = match &origin {
            RecipeOrigin::Operator(p) | RecipeOrigin::Repository(p) => p.clone(),
            _ => unreachable!("only files are loaded"),
        };
        let read_err = |source| RecipeError::Read {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let invalid = |message: String| RecipeError::Invalid {
            origin: origin.clone(),
            message,
        };
        if !meta.is_file() || meta.len() > MAX_RECIPE_BYTES {
            return Err(invalid(format!(
                "must be a regular file of at most {} KiB",
                MAX_RECIPE_BYTES >> 10
            )));
        }
        let mut text = String::new();
        file.take(MAX_RECIPE_BYTES)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        // A copy of the built-in recipe (runner's own checkout has one; so may a project that
        // followed the README) chooses nothing: it is the built-in image, with its cache key.
        let builtin = BUILTIN_RECIPES
            .iter()
            .any(|(n, t)| *n == name.as_str() && *t == text);
        let recipe = if builtin {
            Recipe::parse(RecipeOrigin::BuiltIn, &text)?
        } else {
            Recipe::parse(origin.clone(), &text)?
        };
        if recipe.name != *name {
            return Err(invalid(format!(
                "name '{}' must match the file name '{name}'",
                recipe.name
            )));
        }
        Ok(recipe)
    }

    /// This recipe with another (validated) mirror, e.g. the operator's `--mirror`.
    pub fn with_mirror(&self, mirror: &str) -> Result<Recipe, RecipeError> {
        check_mirror(mirror).map_err(|message| RecipeError::Invalid {
            origin: RecipeOrigin::Inline("--mirror".into()),
            message,
        })?;
        Ok(Recipe {
            mirror: mirror.into(),
            ..self.clone()
        })
    }

    /// The content hash naming the image built from this recipe for `arch`: everything the
    /// build depends on, including where the recipe came from and the mirror, so that a
    /// recipe from a repository can never name (and so poison) the cache entry of a
    /// built-in or operator recipe.
    pub fn hash(&self, arch: Arch, init_script: &str) -> String {
        let mut h = Sha256::new();
        // One field per line; no field can hold a newline (validated above).
        h.update(format!(
            "builder={BUILDER_VERSION}\narch={arch}\norigin={}\nname={}\ndistribution={}\nmirror={}\ndisk={}\n",
            self.origin.kind(),
            self.name,
            self.distribution,
            self.mirror,
            self.disk_size_bytes
        ));
        for p in &self.packages {
            h.update(format!("package={p}\n"));
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

/// A suite or codename as apt knows it: it becomes a field of a sources.list line, so no
/// whitespace, brackets or newlines.
fn is_distribution(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
        && s.len() <= 64
}

/// Debian policy §5.6.1: lowercase letters, digits, '+', '-', '.'; at least two
/// characters, starting with a letter or digit.
fn is_package_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() >= 2
        && s.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// An http(s) URL with a host, checked on the raw text first: the URL parser would quietly
/// drop a newline or tab, and mmdebstrap turns a mirror with spaces or a leading "deb" into
/// a sources.list line of its own.
fn check_mirror(s: &str) -> Result<(), String> {
    let shown = s.escape_debug();
    if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "mirror '{shown}' must be an http(s) URL without spaces or control characters"
        ));
    }
    let url = url::Url::parse(s).map_err(|e| format!("mirror '{shown}' is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "mirror '{shown}' must be an http:// or https:// URL with a host"
        ));
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> RecipeLookup {
        RecipeLookup {
            operator_dir: None,
            repository: RepositoryRecipes::Refused,
        }
    }

    fn name(s: &str) -> ImageName {
        s.parse().unwrap()
    }

    const BASE: &str = "name='x'\ndistribution='trixie'\nmirror='http://deb.debian.org/debian'\n";

    #[test]
    fn builtin_recipe_parses() {
        let r = builtin().find(&name("debian-13")).unwrap();
        assert_eq!(r.distribution, "trixie");
        assert_eq!(r.disk_size_bytes, 4 << 30);
        assert_eq!(r.origin, RecipeOrigin::BuiltIn);
        let all = r.all_packages(Arch::Riscv64);
        assert!(all.contains(&"linux-image-riscv64".to_string()));
        assert!(all.contains(&"qemu-guest-agent".to_string()));
    }

    #[test]
    fn image_names_are_never_paths() {
        for good in ["debian-13", "a", "my_image.v2", "Ubuntu-24.04"] {
            assert!(good.parse::<ImageName>().is_ok(), "{good}");
        }
        // (name, why it is refused)
        let bad = [
            ("", "empty"),
            ("../x", "walks out of images/"),
            ("/etc/x.toml", "absolute path"),
            ("x.toml", "read as a path by older versions"),
            ("images/x", "a path"),
            (".hidden", "starts with a dot"),
            ("-rf", "looks like an option"),
            ("a b", "space"),
            ("x\n[trusted=yes]", "newline"),
            (&"a".repeat(65), "too long"),
        ];
        for (s, why) in bad {
            let err = s.parse::<ImageName>().unwrap_err().to_string();
            assert!(err.contains("not an image name"), "{why}: {err}");
            assert!(!err.contains('\n'), "{why}: one line: {err}");
        }
    }

    #[test]
    fn hash_covers_origin_mirror_arch_and_packages() {
        let a = builtin().find(&name("debian-13")).unwrap();
        let h = |r: &Recipe| r.hash(Arch::Riscv64, "init");
        let mut b = a.clone();
        b.mirror = "http://mirror.example/debian".into();
        assert_ne!(h(&a), h(&b), "mirror");
        assert_ne!(h(&a), a.hash(Arch::Aarch64, "init"), "arch");
        assert_ne!(h(&a), a.hash(Arch::Riscv64, "init2"), "init script");
        let mut c = a.clone();
        c.packages.push("python3".into());
        assert_ne!(h(&a), h(&c), "packages");
        // The same text from a repository or the operator's directory is another image.
        let text = BUILTIN_RECIPES[0].1;
        let repo = Recipe::parse(
            RecipeOrigin::Repository("images/debian-13.toml".into()),
            text,
        )
        .unwrap();
        let operator =
            Recipe::parse(RecipeOrigin::Operator("/etc/r/debian-13.toml".into()), text).unwrap();
        assert_eq!(repo.name, a.name);
        assert_ne!(h(&a), h(&repo), "repository vs built-in");
        assert_ne!(h(&operator), h(&repo), "repository vs operator");
        assert_ne!(h(&a), h(&operator), "operator vs built-in");
        assert_eq!(
            h(&a),
            h(&builtin().find(&name("debian-13")).unwrap()),
            "stable"
        );
    }

    #[test]
    fn hostile_recipes_are_refused_on_one_line() {
        // (recipe text, expected fragment of the error)
        let cases = [
            (format!("{BASE}disk_size='10M'"), "disk_size"),
            (format!("{BASE}disk_size='1T'"), "disk_size '1T'"),
            (format!("{BASE}disk_size='65G'"), "disk_size"),
            (format!("{BASE}packages=['a b']"), "package 'a b'"),
            (format!("{BASE}packages=['curl,evil']"), "package"),
            (format!("{BASE}packages=['?essential']"), "package"),
            (format!("{BASE}packages=['Python3']"), "package"),
            (format!("{BASE}packages=['--allow-unauthenticated']"), "package"),
            (format!("{BASE}colour='red'"), "unknown field"),
            // A newline in distribution would add a sources.list line of the attacker's.
            (
                "name='x'\ndistribution=\"trixie main\\ndeb [trusted=yes] http://evil/ x main\"\nmirror='http://deb.debian.org/debian'".into(),
                "distribution 'trixie main\\ndeb [trusted=yes]",
            ),
            ("name='x'\ndistribution='trixie main'\nmirror='http://x'".into(), "distribution"),
            ("name='x'\ndistribution='../../x'\nmirror='http://x'".into(), "distribution"),
            ("name='x'\ndistribution='Trixie'\nmirror='http://x'".into(), "distribution"),
            ("name='x'\ndistribution='trixie'\nmirror='ftp://x'".into(), "mirror"),
            ("name='x'\ndistribution='trixie'\nmirror='file:///srv/debs'".into(), "mirror 'file:///srv/debs'"),
            ("name='x'\ndistribution='trixie'\nmirror=\"http://x/debian\\n[trusted=yes]\"".into(), "mirror 'http://x/debian\\n[trusted=yes]' must be"),
            ("name='x'\ndistribution='trixie'\nmirror='http://x/debian trixie main'".into(), "mirror"),
            ("name='x'\ndistribution='trixie'\nmirror='deb [trusted=yes] http://x/'".into(), "mirror"),
            ("name='x'\ndistribution='trixie'\nmirror='http://'".into(), "mirror"),
            ("name='bad name'\ndistribution='t'\nmirror='http://x'".into(), "name"),
            ("name='../x'\ndistribution='t'\nmirror='http://x'".into(), "not an image name"),
            ("name = [".into(), "line 1"),
        ];
        for (text, want) in cases {
            let err = Recipe::parse(RecipeOrigin::Inline("test".into()), &text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        // The operator's --mirror goes through the same check.
        let r = builtin().find(&name("debian-13")).unwrap();
        assert!(r.with_mirror("http://x/\n[trusted=yes]").is_err());
        assert_eq!(
            r.with_mirror("https://x/debian").unwrap().mirror,
            "https://x/debian"
        );
    }

    #[test]
    fn repository_recipes_only_where_honoured() {
        let repo = tempfile::tempdir().unwrap();
        std::fs::create_dir(repo.path().join("images")).unwrap();
        let own = BASE.replace("'x'", "'own'");
        std::fs::write(repo.path().join("images/own.toml"), own).unwrap();
        let shadow = BUILTIN_RECIPES[0].1;
        std::fs::write(repo.path().join("images/debian-13.toml"), shadow).unwrap();
        std::fs::write(repo.path().join("images/liar.toml"), BASE).unwrap();
        let honoured = RecipeLookup {
            operator_dir: None,
            repository: RepositoryRecipes::Honoured(repo.path().into()),
        };
        let r = honoured.find(&name("own")).unwrap();
        assert!(matches!(r.origin, RecipeOrigin::Repository(_)));
        // An exact copy of the built-in recipe is the built-in image (same cache key)...
        let d = honoured.find(&name("debian-13")).unwrap();
        assert_eq!(d.origin, RecipeOrigin::BuiltIn);
        // ...while any change makes it the repository's own.
        std::fs::write(
            repo.path().join("images/debian-13.toml"),
            format!("{shadow}\n# mine\n"),
        )
        .unwrap();
        let d = honoured.find(&name("debian-13")).unwrap();
        assert!(matches!(d.origin, RecipeOrigin::Repository(_)));
        let err = honoured.find(&name("liar")).unwrap_err().to_string();
        assert!(err.contains("must match the file name 'liar'"), "{err}");

        // A service: the repository's recipes do not exist for it.
        let err = builtin().find(&name("own")).unwrap_err().to_string();
        assert!(err.contains("unknown image 'own'"), "{err}");
        assert!(err.contains("images/ recipes are not used here"), "{err}");
        assert!(err.contains("built-in: debian-13"), "{err}");
        let d = builtin().find(&name("debian-13")).unwrap();
        assert_eq!(d.origin, RecipeOrigin::BuiltIn);
    }

    #[test]
    fn operator_recipes_come_before_builtin_ones() {
        let dir = tempfile::tempdir().unwrap();
        let text = BUILTIN_RECIPES[0].1.replace("\"4G\"", "\"8G\"");
        std::fs::write(dir.path().join("debian-13.toml"), text).unwrap();
        std::fs::create_dir(dir.path().join("big.toml")).unwrap();
        let lookup = RecipeLookup {
            operator_dir: Some(dir.path().into()),
            repository: RepositoryRecipes::Refused,
        };
        let r = lookup.find(&name("debian-13")).unwrap();
        assert_eq!(r.disk_size_bytes, 8 << 30);
        assert!(matches!(r.origin, RecipeOrigin::Operator(_)));
        let err = lookup.find(&name("big")).unwrap_err().to_string();
        assert!(err.contains("regular file"), "{err}");
    }

    #[test]
    fn sizes() {}
}
