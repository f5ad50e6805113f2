//! The text exposition format: rendering a registry, and relabelling and merging texts from
//! several sources (kata-monitor merges every sandbox's families, each sample labelled with its
//! sandbox).

use std::collections::BTreeMap;

use prometheus::Encoder;

/// Renders a registry in the text format (0.0.4). An encoding failure (which only a bug in a
/// family could cause) renders nothing rather than half a family.
pub fn render(registry: &prometheus::Registry) -> String {
    let mut buf = Vec::new();
    if prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Escapes a label value for the text format.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A family as it appears in a text: its HELP and TYPE lines and its sample lines.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TextFamily {
    /// `# HELP` text (without the name).
    pub help: Option<String>,
    /// `# TYPE` (counter, gauge, histogram, summary, untyped).
    pub kind: Option<String>,
    /// Sample lines, as written.
    pub samples: Vec<String>,
}

/// The family a sample name belongs to, given the declared families (a histogram's
/// `_bucket`, `_sum` and `_count` samples belong to the histogram).
fn family_of<'a>(name: &'a str, declared: &BTreeMap<String, TextFamily>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if declared
                .get(base)
                .and_then(|f| f.kind.as_deref())
                .is_some_and(|k| k == "histogram" || k == "summary")
            {
                return base;
            }
        }
    }
    name
}

/// Adds `text`'s families into `into`, each sample with the extra `labels` (already escaped
/// values). Lines that are not valid samples are skipped. Same-name families merge.
pub fn merge_into(into: &mut BTreeMap<String, TextFamily>, text: &str, labels: &[(&str, &str)]) {
    let extra: String = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect::<Vec<_>>()
        .join(",");
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ') {
                into.entry(name.to_string())
                    .or_default()
                    .help
                    .get_or_insert_with(|| help.to_string());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                into.entry(name.to_string())
                    .or_default()
                    .kind
                    .get_or_insert_with(|| kind.trim().to_string());
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            continue;
        }
        let rest = &line[name_end..];
        // The value (and optional timestamp) after the labels must be numbers.
        let after_labels = match rest.strip_prefix('{') {
            Some(inner) => match inner.rfind('}') {
                Some(close) => &inner[close + 1..],
                None => continue,
            },
            None => rest,
        };
        let mut tail = after_labels.split_whitespace();
        let valid = tail.next().is_some_and(|v| v.parse::<f64>().is_ok())
            && tail.next().is_none_or(|t| t.parse::<i64>().is_ok())
            && tail.next().is_none();
        if !valid {
            continue;
        }
        let relabelled = if extra.is_empty() {
            line.to_string()
        } else if let Some(inner) = rest.strip_prefix('{') {
            let Some(close) = inner.rfind('}') else {
                continue;
            };
            let (existing, tail) = (&inner[..close], &inner[close + 1..]);
            if existing.trim().is_empty() {
                format!("{name}{{{extra}}}{tail}")
            } else {
                format!("{name}{{{extra},{existing}}}{tail}")
            }
        } else {
            format!("{name}{{{extra}}}{rest}")
        };
        let family = family_of(name, into).to_string();
        into.entry(family).or_default().samples.push(relabelled);
    }
}

/// Writes merged families back as text (HELP, TYPE, samples; families sorted by name).
pub fn write(families: &BTreeMap<String, TextFamily>) -> String {
    let mut out = String::new();
    for (name, f) in families {
        if f.samples.is_empty() {
            continue;
        }
        if let Some(h) = &f.help {
            out.push_str(&format!("# HELP {name} {h}\n"));
        }
        if let Some(k) = &f.kind {
            out.push_str(&format!("# TYPE {name} {k}\n"));
        }
        for s in &f.samples {
            out.push_str(s);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_families_from_two_sources_with_their_labels() {
        let a = "# HELP kata_hypervisor_fds Open fds.\n# TYPE kata_hypervisor_fds gauge\nkata_hypervisor_fds 12\n# HELP h A histogram.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 3\nh_count 1\n";
        let b = "# HELP kata_hypervisor_fds Open fds.\n# TYPE kata_hypervisor_fds gauge\nkata_hypervisor_fds 7\ngarbage line {\n";
        let mut m = BTreeMap::new();
        merge_into(&mut m, a, &[("sandbox_id", "a")]);
        merge_into(&mut m, b, &[("sandbox_id", "b\"q")]);
        let text = write(&m);
        assert_eq!(
            text,
            "# HELP h A histogram.\n# TYPE h histogram\nh_bucket{sandbox_id=\"a\",le=\"1\"} 1\nh_sum{sandbox_id=\"a\"} 3\nh_count{sandbox_id=\"a\"} 1\n\
             # HELP kata_hypervisor_fds Open fds.\n# TYPE kata_hypervisor_fds gauge\nkata_hypervisor_fds{sandbox_id=\"a\"} 12\nkata_hypervisor_fds{sandbox_id=\"b\\\"q\"} 7\n"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_merges_without_panic_into_parseable_samples(text in "[ -~\n{}\"#=,]{0,400}", v in "[ -~]{0,20}") {
            let mut m = BTreeMap::new();
            merge_into(&mut m, &text, &[("sandbox_id", v.as_str())]);
            for line in write(&m).lines().filter(|l| !l.starts_with('#')) {
                let value = line.rsplit(' ').next().unwrap_or("");
                let ts_or_value = line.rsplit(' ').nth(1).unwrap_or("");
                proptest::prop_assert!(value.parse::<f64>().is_ok() || ts_or_value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn renders_a_registry() {
        let r = prometheus::Registry::new();
        crate::gauge_family(
            &r,
            "x_total_things",
            "Things.",
            &["item"],
            &[(vec!["a"], 1.0)],
        )
        .expect("family");
        assert_eq!(
            render(&r),
            "# HELP x_total_things Things.\n# TYPE x_total_things gauge\nx_total_things{item=\"a\"} 1\n"
        );
    }
}
