//! GitLab's shared cache in an S3-compatible object store, configured as gitlab-runner's
//! `[runners.cache]` (`Type = "s3"`, `Path`, `Shared`) and `[runners.cache.s3]`
//! (`ServerAddress`, `AccessKey`, `SecretKey`, `BucketName`, `BucketLocation`, `Insecure`,
//! `BucketLookup`). An archive is the same zip as the local cache's, stored as the object
//! `<Path>/runner/<short token>/project/<id>/<key>` (without `runner/<short token>/` when
//! `Shared`), gitlab-runner's layout, so runners of one operator can share it.
//!
//! rusty-s3 signs short-lived presigned URLs; reqwest does the requests, streaming the
//! archive from and to a file, with deadlines and a size cap. The secret key never leaves
//! this module: no message, log line or `Debug` output carries it or a signed URL.

use std::path::Path;
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::Deserialize;

/// How long a presigned URL is valid: enough to start the request; a started transfer is
/// bounded by the deadlines below.
const SIGNED_FOR: Duration = Duration::from_secs(10 * 60);
/// Connecting to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Waiting for any bytes of an answer, or between two chunks.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// A whole transfer (an archive is at most the entry's `cache_max_size`).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Bytes of an error answer read for its S3 error code.
const ERROR_BODY: usize = 4096;

/// `[runners.cache]`, with gitlab-runner's key names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The store: only "s3" here (gitlab-runner also has "gcs" and "azure").
    #[serde(rename = "Type", default)]
    pub kind: String,
    /// A prefix for every object.
    #[serde(rename = "Path", default)]
    pub path: String,
    /// One cache for every runner entry (and gitlab-runner) that uses the bucket, instead of
    /// one per runner token.
    #[serde(rename = "Shared", default)]
    pub shared: bool,
    /// `[runners.cache.s3]`.
    #[serde(rename = "s3", default)]
    pub s3: Option<S3Config>,
}

/// `[runners.cache.s3]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `host` or `host:port`, without a scheme.
    #[serde(rename = "ServerAddress", default)]
    pub server_address: String,
    #[serde(rename = "AccessKey", default)]
    pub access_key: String,
    #[serde(rename = "SecretKey", default)]
    pub secret_key: Secret,
    #[serde(rename = "BucketName", default)]
    pub bucket_name: String,
    /// The region (default us-east-1).
    #[serde(rename = "BucketLocation", default)]
    pub bucket_location: String,
    /// http instead of https.
    #[serde(rename = "Insecure", default)]
    pub insecure: bool,
    /// "path" (default here: any S3-compatible server has it) or "dns" (bucket.host).
    #[serde(rename = "BucketLookup", default)]
    pub bucket_lookup: String,
}

/// A secret that no `Debug` or `Display` shows.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<hidden>\"")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The request did not get an answer. (reqwest's message without the URL: it is signed.)
    #[error("cannot reach the cache server: {0}")]
    Http(String),
    #[error("the cache server answered {status}{code} for {object}")]
    Status {
        object: String,
        status: u16,
        /// The S3 error code (` AccessDenied`, ` SignatureDoesNotMatch`…), if it sent one.
        code: String,
    },
    #[error("{object} is over this runner's cache_max_size = {cap}")]
    TooLarge { object: String, cap: String },
    #[error("cache key '{0}' names a path outside the project's cache; remove `../` from the key")]
    Key(String),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The shared cache of one `[[runners]]` entry.
#[derive(Debug, Clone)]
pub struct S3Store {
    bucket: Bucket,
    credentials: Credentials,
    /// `Path` and `runner/<short token>` (unless shared), joined, without slashes around.
    prefix: String,
    client: reqwest::Client,
    max_size: u64,
}

impl CacheConfig {
    /// Checks the section for `runner`, naming the key that is wrong (one line).
    pub fn check(&self, runner: &str) -> Result<(), String> {
        let at = format!("runner '{runner}': [runners.cache]");
        if self.kind != "s3" {
            return Err(format!(
                "{at} Type = \"{}\" is not supported; use Type = \"s3\" (an S3-compatible server), or remove [runners.cache] for the local cache",
                self.kind
            ));
        }
        let Some(s3) = &self.s3 else {
            return Err(format!(
                "{at} has Type = \"s3\" but no [runners.cache.s3] section; add one with ServerAddress, BucketName, AccessKey and SecretKey"
            ));
        };
        let at = format!("runner '{runner}': [runners.cache.s3]");
        for (key, value) in [
            ("ServerAddress", &s3.server_address),
            ("BucketName", &s3.bucket_name),
            ("AccessKey", &s3.access_key),
            ("SecretKey", &s3.secret_key.0),
        ] {
            if value.trim().is_empty() {
                return Err(format!(
                    "{at} {key} is missing; set it (this runner reads no credentials from elsewhere)"
                ));
            }
        }
        if s3.server_address.contains("://") || s3.server_address.contains('/') {
            return Err(format!(
                "{at} ServerAddress = \"{}\" must be host or host:port, without a scheme or path (Insecure = true for http)",
                s3.server_address
            ));
        }
        if !matches!(s3.bucket_lookup.as_str(), "" | "auto" | "path" | "dns") {
            return Err(format!(
                "{at} BucketLookup = \"{}\" is not \"path\" or \"dns\"",
                s3.bucket_lookup
            ));
        }
        self.bucket(s3)
            .map(|_| ())
            .map_err(|e| format!("{at}: {e}"))
    }

    fn bucket(&self, s3: &S3Config) -> Result<Bucket, String> {
        let scheme = if s3.insecure { "http" } else { "https" };
        let endpoint: reqwest::Url = format!("{scheme}://{}", s3.server_address)
            .parse()
            .map_err(|e| format!("ServerAddress = \"{}\": {e}", s3.server_address))?;
        let style = if s3.bucket_lookup == "dns" {
            UrlStyle::VirtualHost
        } else {
            UrlStyle::Path
        };
        let region = if s3.bucket_location.is_empty() {
            "us-east-1".to_string()
        } else {
            s3.bucket_location.clone()
        };
        Bucket::new(endpoint, style, s3.bucket_name.clone(), region)
            .map_err(|e| format!("BucketName = \"{}\": {e}", s3.bucket_name))
    }
}

/// gitlab-runner's short form of a runner token: without its known prefixes (`glrt-`,
/// `t1_`…, `glrtr-`, `glcbt-`, `GR` and 7 hex digits), the first 9 characters.
pub fn short_token(token: &str) -> String {
    let mut t = token;
    if let Some(rest) = t.strip_prefix("glrt-") {
        t = rest;
    } else if let Some(rest) = t.strip_prefix("glrtr-") {
        t = rest;
    } else if let Some(rest) = t.strip_prefix("glcbt-") {
        t = rest;
    } else if t.len() >= 9
        && t.starts_with("GR")
        && t.as_bytes()[2..9].iter().all(u8::is_ascii_hexdigit)
    {
        t = &t[9..];
    }
    for p in ["t1_", "t2_", "t3_"] {
        if let Some(rest) = t.strip_prefix(p) {
            t = rest;
            break;
        }
    }
    t.chars().take(9).collect()
}

impl S3Store {
    /// The store of an entry whose config passed [`CacheConfig::check`]; `token` is the
    /// entry's runner token, `max_size` its `cache_max_size`.
    pub fn new(config: &CacheConfig, token: &str, max_size: u64) -> Result<S3Store, String> {
        let s3 = config.s3.as_ref().ok_or("no [runners.cache.s3]")?;
        let bucket = config.bucket(s3)?;
        let credentials = Credentials::new(s3.access_key.clone(), s3.secret_key.0.clone());
        let mut parts: Vec<String> = config
            .path
            .split('/')
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        if !config.shared {
            parts.push("runner".into());
            parts.push(short_token(token));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .timeout(TRANSFER_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.without_url().to_string())?;
        Ok(S3Store {
            bucket,
            credentials,
            prefix: parts.join("/"),
            client,
            max_size,
        })
    }

    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// The object of `key`'s archive for `project`; a key that would leave the project's
    /// part of the bucket is refused (gitlab-runner's rule).
    pub fn object(&self, project: u64, key: &str) -> Result<String, S3Error> {
        let mut parts: Vec<&str> = Vec::new();
        for p in key.split('/') {
            match p {
                "" | "." => {}
                ".." => return Err(S3Error::Key(key.to_string())),
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err(S3Error::Key(key.to_string()));
        }
        let project = format!("project/{project}/{}", parts.join("/"));
        Ok(if self.prefix.is_empty() {
            project
        } else {
            format!("{}/{project}", self.prefix)
        })
    }

    /// Downloads `key`'s archive into `dest`; `Ok(None)` when there is none. Refuses more
    /// than `max_size` bytes.
    pub async fn get(&self, project: u64, key: &str, dest: &Path) -> Result<Option<u64>, S3Error> {
        use tokio::io::AsyncWriteExt;
        let object = self.object(project, key)?;
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &object)
            .sign(SIGNED_FOR);
        let mut resp = self.client.get(url).send().await.map_err(http)?;
        if !resp.status().is_success() {
            let e = status_error(resp, object).await;
            // No such key is no cache; no such bucket is the operator's to fix.
            return match &e {
                S3Error::Status {
                    status: 404, code, ..
                } if code.trim() != "NoSuchBucket" => Ok(None),
                _ => Err(e),
            };
        }
        let too_large = || S3Error::TooLarge {
            object: object.clone(),
            cap: crate::serve::limits::size_text(self.max_size),
        };
        if resp.content_length().is_some_and(|n| n > self.max_size) {
            return Err(too_large());
        }
        let io = |what, source| S3Error::Io {
            what,
            path: dest.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| io("create", e))?;
        let mut total = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            total += chunk.len() as u64;
            if total > self.max_size {
                return Err(too_large());
            }
            file.write_all(&chunk).await.map_err(|e| io("write", e))?;
        }
        file.flush().await.map_err(|e| io("write", e))?;
        Ok(Some(total))
    }

    /// Uploads the archive `file` as `key`'s, streaming it.
    pub async fn put(&self, project: u64, key: &str, file: &Path) -> Result<(), S3Error> {
        let object = self.object(project, key)?;
        let io = |what, source| S3Error::Io {
            what,
            path: file.to_path_buf(),
            source,
        };
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| io("read", e))?;
        let size = f.metadata().await.map_err(|e| io("read", e))?.len();
        let url = self
            .bucket
            .put_object(Some(&self.credentials), &object)
            .sign(SIGNED_FOR);
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        let resp = self
            .client
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/zip")
            .body(body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            // A server that refuses a request (403) may close the connection before it reads
            // the body, and the upload sees only that: ask without a body what it refuses.
            Err(e) => return Err(self.refusal(&object).await.unwrap_or_else(|| http(e))),
        };
        if !resp.status().is_success() {
            return Err(status_error(resp, object).await);
        }
        Ok(())
    }

    /// The server's refusal of a signed HEAD of `object` (403, 400…), if it refuses it.
    async fn refusal(&self, object: &str) -> Option<S3Error> {
        let url = self
            .bucket
            .head_object(Some(&self.credentials), object)
            .sign(SIGNED_FOR);
        let resp = self.client.head(url).send().await.ok()?;
        let status = resp.status();
        (status.is_client_error() && status != reqwest::StatusCode::NOT_FOUND).then(|| {
            S3Error::Status {
                object: object.to_string(),
                status: status.as_u16(),
                code: String::new(),
            }
        })
    }

    /// Creates the bucket (for tests and first setups; gitlab-runner expects it to exist).
    pub async fn create_bucket(&self) -> Result<(), S3Error> {
        let url = self
            .bucket
            .create_bucket(&self.credentials)
            .sign(SIGNED_FOR);
        let resp = self.client.put(url).send().await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(status_error(resp, self.bucket.name().to_string()).await);
        }
        Ok(())
    }
}

/// reqwest's error without its URL (a presigned URL carries the signature).
fn http(e: reqwest::Error) -> S3Error {
    S3Error::Http(crate::outcome::chain(&e.without_url()))
}

/// An error answer: its status and the S3 `<Code>` from the first bytes of its body.
async fn status_error(mut resp: reqwest::Response, object: String) -> S3Error {
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    let code = text
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.trim())
        .filter(|c| !c.is_empty() && c.len() < 64 && c.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(|c| format!(" {c}"))
        .unwrap_or_default();
    S3Error::Status {
        object,
        status,
        code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> CacheConfig {
        toml::from_str(toml_text).unwrap()
    }

    const GOOD: &str = "Type = 's3'\nPath = 'ci/'\n[s3]\nServerAddress = '127.0.0.1:9000'\nAccessKey = 'AK'\nSecretKey = 'very-secret'\nBucketName = 'cache'\nInsecure = true\n";

    #[test]
    fn objects_follow_gitlab_runners_layout() {
        let c = config(GOOD);
        c.check("r").unwrap();
        let s = S3Store::new(&c, "glrt-t1_abcdefghijklmn", 1 << 20).unwrap();
        assert_eq!(
            s.object(7, "deps-non_protected").unwrap(),
            "ci/runner/abcdefghi/project/7/deps-non_protected"
        );
        let mut shared = c.clone();
        shared.shared = true;
        shared.path.clear();
        let s = S3Store::new(&shared, "glrt-abc", 1 << 20).unwrap();
        assert_eq!(s.object(7, "k").unwrap(), "project/7/k");
        assert_eq!(s.object(7, "a//./b").unwrap(), "project/7/a/b");
        for bad in ["../../other/k", "a/../../b", "", "/"] {
            assert!(matches!(s.object(7, bad), Err(S3Error::Key(_))), "{bad}");
        }
    }

    #[test]
    fn short_tokens_are_gitlab_runners() {
        // (token, short)
        let cases = [
            ("glrt-t1_abcdefghijk", "abcdefghi"),
            ("glrt-abcdefghijk", "abcdefghi"),
            ("glrtr-abcdefghijk", "abcdefghi"),
            ("GR1348941abcdefghijk", "abcdefghi"),
            ("legacytokenvalue", "legacytok"),
            ("short", "short"),
        ];
        for (token, want) in cases {
            assert_eq!(short_token(token), want, "{token}");
        }
    }

    #[test]
    fn a_bad_section_is_one_line_naming_the_key() {
        // (config, message part)
        let cases = [
            ("Type = 'gcs'", "Type = \"gcs\" is not supported"),
            ("Type = 's3'", "no [runners.cache.s3] section"),
            (
                "Type = 's3'\n[s3]\nServerAddress = 'h'\nAccessKey = 'a'\nSecretKey = 's'",
                "[runners.cache.s3] BucketName is missing",
            ),
            (
                "Type = 's3'\n[s3]\nBucketName = 'b'\nAccessKey = 'a'\nSecretKey = 's'",
                "[runners.cache.s3] ServerAddress is missing",
            ),
            (
                "Type = 's3'\n[s3]\nServerAddress = 'http://h:9000'\nBucketName = 'b'\nAccessKey = 'a'\nSecretKey = 's'",
                "ServerAddress = \"http://h:9000\" must be host or host:port",
            ),
            (
                "Type = 's3'\n[s3]\nServerAddress = 'h'\nBucketName = 'b'\nAccessKey = 'a'",
                "SecretKey is missing",
            ),
        ];
        for (text, want) in cases {
            let e = config(text).check("r").unwrap_err();
            assert!(e.starts_with("runner 'r': [runners.cache"), "{e}");
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_secret_is_never_shown() {
        let c = config(GOOD);
        assert!(!format!("{c:?}").contains("very-secret"));
        let s = S3Store::new(&c, "t", 1).unwrap();
        assert!(!format!("{s:?}").contains("very-secret"));
    }
}
