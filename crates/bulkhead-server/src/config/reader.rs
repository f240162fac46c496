//! Where values come from: the process environment over `.env`, secret
//! files, and the settings table's defaults; and the typed reads every
//! setting goes through, each remembering where its value came from.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use super::settings::{self, Default};

/// A configuration problem, always about one variable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

pub(crate) fn invalid(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        message: message.into(),
    }
}

/// Something worth saying at start that does not stop it, about one
/// variable. Never carries a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub variable: String,
    pub message: String,
}

/// Where a value came from, for `bulkhead config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    Environment,
    /// The `.env` file in the working directory.
    DotEnv,
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Environment => f.write_str("environment"),
            Source::DotEnv => f.write_str(".env"),
            Source::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// The variables Bulkhead reads: process environment over `.env`, plus a
/// folder of secret files.
#[derive(Debug, Clone, std::default::Default)]
pub struct Environment {
    vars: HashMap<String, String>,
    /// The names whose value is `.env`'s (the environment did not set them).
    from_dotenv: HashSet<String>,
    pub(crate) secrets_dir: PathBuf,
}

impl Environment {
    /// The process environment, over `.env` in the working directory when
    /// there is one (the environment wins). Nothing is written back.
    pub fn from_process() -> Result<Environment, ConfigError> {
        let mut dotenv = HashMap::new();
        match dotenvy::from_path_iter(".env") {
            Ok(entries) => {
                for entry in entries {
                    let (key, value) =
                        entry.map_err(|e| invalid(".env", format!("cannot be parsed: {e}")))?;
                    dotenv.insert(key, value);
                }
            }
            Err(e) if e.not_found() => {}
            Err(e) => return Err(invalid(".env", format!("cannot be read: {e}"))),
        }
        let process = std::env::vars_os()
            .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Ok(Environment::layered(process, dotenv))
    }

    /// `process` over `dotenv`.
    pub fn layered(process: HashMap<String, String>, dotenv: HashMap<String, String>) -> Self {
        let from_dotenv = dotenv
            .keys()
            .filter(|key| !process.contains_key(*key))
            .cloned()
            .collect();
        let mut vars = dotenv;
        vars.extend(process);
        Environment {
            from_dotenv,
            ..Environment::from_map(vars)
        }
    }

    pub fn from_map(vars: HashMap<String, String>) -> Environment {
        let secrets_dir = vars
            .get("SECRETS_DIR")
            .filter(|d| !d.trim().is_empty())
            .map(|d| PathBuf::from(d.trim()))
            .unwrap_or_else(|| PathBuf::from(super::DEFAULT_SECRETS_DIR));
        Environment {
            vars,
            from_dotenv: HashSet::new(),
            secrets_dir,
        }
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Environment {
        Environment::from_map(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A variable's value; empty counts as unset.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// Where a set variable's value came from.
    fn source_of(&self, name: &str) -> Source {
        if self.from_dotenv.contains(name) {
            Source::DotEnv
        } else {
            Source::Environment
        }
    }

    /// One warning per variable that is not a setting but is a slip away
    /// from one: `MODEL_NAM` (did you mean `MODEL_NAME`?), `model_name`.
    /// Only names that start like ours (`MODEL_`, `SANDBOX_`…) are
    /// considered, so that `HOME` is never taken for `HOST`.
    pub fn unknown_variables(&self) -> Vec<ConfigWarning> {
        let known: Vec<String> = settings::known_names().collect();
        let prefixes: HashSet<&str> = known
            .iter()
            .filter_map(|name| name.split_once('_').map(|(prefix, _)| prefix))
            .collect();
        let mut warnings: Vec<ConfigWarning> = self
            .vars
            .keys()
            .filter(|name| !known.contains(name))
            .filter_map(|name| {
                let upper = name.to_ascii_uppercase();
                let (prefix, _) = upper.split_once('_')?;
                if !prefixes.contains(prefix) {
                    return None;
                }
                let (distance, closest) = known
                    .iter()
                    .map(|k| (strsim::damerau_levenshtein(&upper, k), k))
                    .min()?;
                (distance <= 2).then(|| ConfigWarning {
                    variable: name.clone(),
                    message: format!(
                        "{name} is not a Bulkhead setting; did you mean {closest}?{}",
                        if self.from_dotenv.contains(name) {
                            " (set in .env)"
                        } else {
                            ""
                        }
                    ),
                })
            })
            .collect();
        warnings.sort_by(|a, b| a.variable.cmp(&b.variable));
        warnings
    }
}

/// Reads typed values and remembers where each came from.
pub(crate) struct Reader<'a> {
    pub(crate) env: &'a Environment,
    pub(crate) sources: HashMap<&'static str, Source>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(env: &'a Environment) -> Self {
        Reader {
            env,
            sources: HashMap::new(),
        }
    }

    /// The variable's value, or `None` when it is unset (its default, if it
    /// has one, is the caller's to apply).
    pub(crate) fn raw(&mut self, name: &'static str) -> Option<String> {
        debug_assert!(
            settings::find(name).is_some() || settings::ALIASES.iter().any(|(old, _)| *old == name),
            "{name} is read but is not in the settings table"
        );
        let value = self.env.get(name).map(|v| v.trim().to_string());
        self.sources.insert(
            name,
            if value.is_some() {
                self.env.source_of(name)
            } else {
                Source::Default
            },
        );
        value
    }

    /// The variable's value, else the settings table's literal default.
    pub(crate) fn text(&mut self, name: &'static str) -> String {
        self.raw(name)
            .unwrap_or_else(|| literal_default(name).to_string())
    }

    /// Parses the value (or the table's default) and checks it.
    pub(crate) fn parse<T: std::str::FromStr>(
        &mut self,
        name: &'static str,
        expected: &str,
        valid: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError> {
        let text = self.text(name);
        match text.parse::<T>() {
            Ok(value) if valid(&value) => Ok(value),
            _ => Err(invalid(name, format!("expected {expected}, got {text:?}"))),
        }
    }

    pub(crate) fn flag(&mut self, name: &'static str) -> Result<bool, ConfigError> {
        let text = self.text(name);
        match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(invalid(
                name,
                format!("expected true or false, got {text:?}"),
            )),
        }
    }

    pub(crate) fn seconds(
        &mut self,
        name: &'static str,
        max: f64,
    ) -> Result<Duration, ConfigError> {
        let seconds = self.parse(
            name,
            &format!("a number of seconds above 0 and at most {max}"),
            |s: &f64| s.is_finite() && *s > 0.0 && *s <= max,
        )?;
        Ok(Duration::from_secs_f64(seconds))
    }

    /// A size in bytes, written as `268435456`, `256m`, `64k` or `1g`.
    pub(crate) fn size(&mut self, name: &'static str, min: u64) -> Result<u64, ConfigError> {
        let text = self.text(name);
        let lower = text.to_ascii_lowercase();
        let lower = lower.trim_end_matches('b');
        let (digits, unit) = match lower.char_indices().last() {
            Some((i, 'k')) => (&lower[..i], 1u64 << 10),
            Some((i, 'm')) => (&lower[..i], 1 << 20),
            Some((i, 'g')) => (&lower[..i], 1 << 30),
            _ => (lower, 1),
        };
        digits
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .filter(|bytes| *bytes >= min)
            .ok_or_else(|| {
                invalid(
                    name,
                    format!("expected a size of at least {min} bytes such as 256m, 64k or 1g, got {text:?}"),
                )
            })
    }

    /// `<NAME>`, else the file `<NAME>_FILE` names, else
    /// `<secrets dir>/<name>`. Setting both of the first two is an error.
    pub(crate) fn secret(
        &mut self,
        name: &'static str,
        file_var: &'static str,
    ) -> Result<Option<SecretString>, ConfigError> {
        debug_assert!(settings::find(name).is_some_and(|s| s.secret), "{name}");
        let (value, source) = self
            .env
            .secret(name, file_var)
            .map_err(|e| invalid(if e.in_file_var { file_var } else { name }, e.message))?;
        self.sources.insert(name, source);
        Ok(value)
    }
}

/// Why a secret could not be read: the message, and whether it is about
/// the `<NAME>_FILE` variable rather than `<NAME>`.
#[derive(Debug)]
pub(crate) struct SecretError {
    pub in_file_var: bool,
    pub message: String,
}

impl Environment {
    /// A secret's value (trimmed; blank counts as unset) and where it came
    /// from: `<name>`, else the file `<file_var>` names, else
    /// `<secrets dir>/<name, lowercase>`. Setting both of the first two is
    /// an error. Every secret is read here, those the settings name and
    /// those an agents file names.
    pub(crate) fn secret(
        &self,
        name: &str,
        file_var: &str,
    ) -> Result<(Option<SecretString>, Source), SecretError> {
        let (value, source) = match (self.get(name), self.get(file_var)) {
            (Some(_), Some(_)) => {
                return Err(SecretError {
                    in_file_var: false,
                    message: format!("set either {name} or {file_var}, not both"),
                });
            }
            (Some(value), None) => (Some(value.to_string()), self.source_of(name)),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let value = read_secret_file(&path).map_err(|e| SecretError {
                    in_file_var: true,
                    message: format!("cannot read {}: {e}", path.display()),
                })?;
                (Some(value), Source::File(path))
            }
            (None, None) => {
                let path = self.secrets_dir.join(name.to_ascii_lowercase());
                match read_secret_file(&path) {
                    Ok(value) => (Some(value), Source::File(path)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, Source::Default),
                    Err(e) => {
                        return Err(SecretError {
                            in_file_var: false,
                            message: format!("cannot read {}: {e}", path.display()),
                        });
                    }
                }
            }
        };
        let value = value
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(SecretString::from);
        Ok((value, source))
    }
}

/// Words that mark a value as an example to be replaced, not a secret:
/// what example files, tutorials and manifests put where a secret goes.
const PLACEHOLDER_MARKS: &[&str] = &[
    "replace-me",
    "replace_me",
    "replaceme",
    "change-me",
    "change_me",
    "changeme",
    "placeholder",
    "your-key",
    "your_key",
    "your-token",
    "your_token",
    "your-password",
    "your_password",
    "xxxxxxxx",
    "<",
    ">",
];

/// Refuses a secret that is an obvious placeholder (`REPLACE-ME…`), with
/// one line naming the variable and where to put the real one; the value
/// itself is never repeated.
pub(crate) fn refuse_placeholder(
    name: &'static str,
    value: Option<&SecretString>,
) -> Result<(), ConfigError> {
    let Some(value) = value else {
        return Ok(());
    };
    let lower = secrecy::ExposeSecret::expose_secret(value).to_ascii_lowercase();
    if PLACEHOLDER_MARKS.iter().any(|mark| lower.contains(mark)) {
        return Err(invalid(
            name,
            format!(
                "looks like an example's placeholder (REPLACE-ME, change-me, <…>), not a secret: put the real value in /run/secrets/{} (or {name}_FILE)",
                name.to_ascii_lowercase()
            ),
        ));
    }
    Ok(())
}

/// The table's literal default of a setting that has one.
pub(crate) fn literal_default(name: &str) -> &'static str {
    match settings::find(name).map(|s| s.default) {
        Some(Default::Literal(value)) => value,
        other => panic!("{name} has no literal default in the settings table: {other:?}"),
    }
}

fn read_secret_file(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}
