//! A small, strict parser of the Prometheus text exposition format (version 0.0.4):
//! `# HELP` / `# TYPE` / other comments, samples `name{label="value",…} value [timestamp]`,
//! label values with `\\`, `\"` and `\n` escapes, values including `NaN`, `+Inf`, `-Inf`.
//! Anything else is an error naming the line: a node that answers with garbage must give an
//! error result, not a half-read one.

use std::fmt;

/// A sample's labels, in the order written.
pub type Labels = Vec<(String, String)>;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where and why the text is not valid exposition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses a whole exposition.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim_matches(|c| c == ' ' || c == '\t' || c == '\r');
        if line.is_empty() {
            continue;
        }
        let fail = |message: String| ParseError {
            line: index + 1,
            message,
        };
        if let Some(comment) = line.strip_prefix('#') {
            check_comment(comment).map_err(fail)?;
            continue;
        }
        samples.push(parse_sample(line).map_err(fail)?);
    }
    Ok(samples)
}

fn check_comment(comment: &str) -> Result<(), String> {
    let mut words = comment.split_whitespace();
    match words.next() {
        Some("HELP") => {
            let name = words.next().ok_or("HELP without a metric name")?;
            check_name(name)
        }
        Some("TYPE") => {
            let name = words.next().ok_or("TYPE without a metric name")?;
            check_name(name)?;
            match words.next() {
                Some("counter" | "gauge" | "histogram" | "summary" | "untyped") => Ok(()),
                other => Err(format!("unknown metric type {other:?}")),
            }
        }
        // Any other comment is free text.
        _ => Ok(()),
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if is_name_start(c) && chars.all(is_name_char) => Ok(()),
        _ => Err(format!("{name:?} is not a metric name")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    if !rest.starts_with([' ', '\t']) {
        return Err(format!("expected a space and a value after {name:?}"));
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next().ok_or("missing value")?)?;
    let timestamp_ms = match fields.next() {
        Some(t) => Some(
            t.parse::<i64>()
                .map_err(|_| format!("{t:?} is not a timestamp in milliseconds"))?,
        ),
        None => None,
    };
    if let Some(extra) = fields.next() {
        return Err(format!(
            "unexpected {extra:?} after the value and timestamp"
        ));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
        timestamp_ms,
    })
}

/// Parses `label="value",…}` (the opening brace already consumed); returns the labels and
/// the text after the closing brace.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let name_end = s.find(|c: char| !is_name_char(c)).unwrap_or(s.len());
        let name = &s[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) || name.contains(':') {
            return Err(format!("bad label name at {:?}", truncate(s)));
        }
        s = s[name_end..].trim_start();
        s = s
            .strip_prefix('=')
            .ok_or_else(|| format!("expected = after label {name:?}"))?
            .trim_start();
        s = s
            .strip_prefix('"')
            .ok_or_else(|| format!("expected a quoted value for label {name:?}"))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated value of label {name:?}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => {
                        return Err(format!(
                            "bad escape {:?} in label {name:?}",
                            other.map(|(_, c)| c)
                        ));
                    }
                },
                Some((_, c)) => value.push(c),
            }
        };
        s = s[end + 1..].trim_start();
        labels.push((name.to_owned(), value));
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err(format!("expected , or }} after label {name:?}"));
        }
    }
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => text
            .parse::<f64>()
            .ok()
            // Rust also reads "inf" and "nan" in any case; the format does not.
            .filter(|_| {
                !text
                    .chars()
                    .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
            })
            .ok_or_else(|| format!("{text:?} is not a number")),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(20) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_format() {
        let text = "# HELP eth_balance The balance\n\
                    # TYPE eth_balance gauge\n\
                    eth_balance{account=\"0xAB\"} 1.5\n\
                    \n\
                    head_tracker_current_head 1234 1700000000000\n\
                    weird{a=\"x\\\"y\\\\z\\n\",b=\"\"} NaN\n\
                    up{job=\"a\",} +Inf\n\
                    down -Inf\n\
                    # a free comment\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[0].label("account"), Some("0xAB"));
        assert_eq!(samples[0].value, 1.5);
        assert_eq!(samples[1].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(samples[2].label("a"), Some("x\"y\\z\n"));
        assert!(samples[2].value.is_nan());
        assert_eq!(samples[3].value, f64::INFINITY);
        assert_eq!(samples[4].value, f64::NEG_INFINITY);
    }

    #[test]
    fn refuses_garbage_with_the_line() {
        for (text, line) in [
            ("ok 1\n<html><body>", 2),
            ("a{b=\"c} 1", 1),
            ("a{b=c} 1", 1),
            ("a 1 2 3", 1),
            ("a one", 1),
            ("a inf", 1),
            ("# TYPE a thing", 1),
            ("9lives 1", 1),
            ("a{b=\"\\x\"} 1", 1),
            ("ok 1\nok 2\n{} 3", 3),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z_:][a-zA-Z0-9_:]{0,12}"
    }

    fn label_name() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_]{0,8}"
    }

    fn escape(v: &str) -> String {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    fn render(s: &Sample) -> String {
        let mut out = s.name.clone();
        if !s.labels.is_empty() {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            out += &format!("{{{}}}", labels.join(","));
        }
        let value = if s.value.is_nan() {
            "NaN".to_owned()
        } else if s.value == f64::INFINITY {
            "+Inf".to_owned()
        } else if s.value == f64::NEG_INFINITY {
            "-Inf".to_owned()
        } else {
            format!("{:?}", s.value)
        };
        out += &format!(" {value}");
        if let Some(t) = s.timestamp_ms {
            out += &format!(" {t}");
        }
        out
    }

    fn sample() -> impl Strategy<Value = Sample> {
        (
            name(),
            proptest::collection::vec((label_name(), any::<String>()), 0..4),
            prop_oneof![any::<f64>(), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
            proptest::option::of(any::<i64>()),
        )
            .prop_map(|(name, labels, value, timestamp_ms)| Sample {
                name,
                labels: labels
                    .into_iter()
                    // A CR would be trimmed away as line noise; the format has no escape
                    // for it, so exporters never emit a raw one.
                    .map(|(k, v)| (k, v.replace('\r', "")))
                    .collect(),
                value,
                timestamp_ms,
            })
    }

    proptest! {
        /// Whatever is rendered in the format is read back as it was.
        #[test]
        fn round_trips(samples in proptest::collection::vec(sample(), 0..20)) {
            let text: String = samples.iter().map(|s| render(s) + "\n").collect();
            let parsed = parse(&text).unwrap();
            prop_assert_eq!(parsed.len(), samples.len());
            for (got, want) in parsed.iter().zip(&samples) {
                prop_assert_eq!(&got.name, &want.name);
                prop_assert_eq!(&got.labels, &want.labels);
                prop_assert_eq!(got.timestamp_ms, want.timestamp_ms);
                prop_assert!(got.value == want.value || (got.value.is_nan() && want.value.is_nan()));
            }
        }

        /// Arbitrary input never panics: it parses or names a line.
        #[test]
        fn never_panics(text in any::<String>()) {
            if let Err(e) = parse(&text) {
                prop_assert!(e.line >= 1);
            }
        }
    }
}
