//! Key metadata shared by every configuration section.
//!
//! Each section struct is declared once with [`config_section!`]; the macro produces the serde
//! struct, its `Default` and a table of [`KeySpec`]s. Everything else (unknown-key detection,
//! annotation rules, the shipped TOML files and `docs/configuration.md`) reads that table, so a
//! key exists in exactly one place.

/// Whether, and how, a key may be overridden by a pod annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dynamic {
    /// Only the configuration file sets it.
    No,
    /// An annotation may set it (hypervisor keys: only when `enable_annotations` matches).
    Yes,
    /// An annotation may set it to a path, which must also match a glob in the named list key.
    Path(&'static str),
}

/// Whether the runtime acts on a key today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Implemented.
    Yes,
    /// Parsed and validated so Kata files load, but not acted on yet; `kata-runtime env` and
    /// `check` report it when a file sets it to a non-default value.
    NotYet,
}

/// Which hypervisor sections a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// Every hypervisor.
    All,
    /// Only the listed hypervisors.
    Only(&'static [crate::HypervisorKind]),
}

/// Description of one configuration key.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// TOML key name.
    pub name: &'static str,
    /// Human description (first line is a summary).
    pub doc: &'static str,
    /// Annotation rule.
    pub dynamic: Dynamic,
    /// Implementation status.
    pub support: Support,
    /// Hypervisors the key applies to (only meaningful in hypervisor sections).
    pub applies: Applies,
}

impl KeySpec {
    /// True when this key is relevant for `kind`.
    pub fn applies_to(&self, kind: crate::HypervisorKind) -> bool {
        match self.applies {
            Applies::All => true,
            Applies::Only(list) => list.contains(&kind),
        }
    }
}

/// Finds the spec of `name` in `keys`.
pub fn find_key(keys: &'static [KeySpec], name: &str) -> Option<&'static KeySpec> {
    keys.iter().find(|k| k.name == name)
}

/// Declares a configuration section: a serde struct with `deny_unknown_fields`, its `Default`
/// and `KEYS`, its key table.
///
/// Each field is written `/// doc` then `name: Type = default_expr, dynamic, support, applies;`.
macro_rules! config_section {
    (
        $(#[$smeta:meta])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])+
                $field:ident : $ty:ty = $default:expr, $dynamic:expr, $support:expr, $applies:expr;
            )*
        }
    ) => {
        $(#[$smeta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[doc = $doc])+
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $name {
            /// Every key of this section, in declaration order.
            pub const KEYS: &'static [$crate::schema::KeySpec] = &[
                $(
                    $crate::schema::KeySpec {
                        name: stringify!($field),
                        doc: concat!($($doc, "\n"),+),
                        dynamic: $dynamic,
                        support: $support,
                        applies: $applies,
                    },
                )*
            ];
        }
    };
}

pub(crate) use config_section;

/// Serialises a section to a TOML table.
pub(crate) fn to_table<T: serde::Serialize>(value: &T) -> Option<toml::Table> {
    match toml::Value::try_from(value) {
        Ok(toml::Value::Table(t)) => Some(t),
        _ => None,
    }
}

/// The closest candidate by edit distance, when it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 4) && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
