//! Reading a `/metrics` answer as a monitoring system would: every line must be Prometheus
//! text (a `#` comment or `name{labels} value`), and the samples are parsed with
//! `prometheus-parse`.

#![allow(dead_code)]

/// A parsed scrape.
pub struct Metrics {
    samples: Vec<prometheus_parse::Sample>,
}

/// Parse `text`; panics, naming the line, when a line is not Prometheus text.
pub fn parse(text: &str) -> Metrics {
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        assert!(is_sample_line(line), "not Prometheus text: {line:?}");
    }
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse");
    assert!(!scrape.samples.is_empty(), "no samples in: {text}");
    Metrics {
        samples: scrape.samples,
    }
}

/// `name`, then optional `{k="v",…}`, a space and a number (no timestamp: the controller
/// sends none).
fn is_sample_line(line: &str) -> bool {
    let (head, value) = match line.rsplit_once(' ') {
        Some(x) => x,
        None => return false,
    };
    let number = value.parse::<f64>().is_ok() || matches!(value, "+Inf" | "-Inf" | "NaN");
    let (name, labels) = match head.split_once('{') {
        Some((n, rest)) => match rest.strip_suffix('}') {
            Some(l) => (n, Some(l)),
            None => return false,
        },
        None => (head, None),
    };
    let name_ok = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    let labels_ok = labels.is_none_or(|l| {
        l.is_empty()
            || l.split("\",").all(|pair| {
                pair.split_once("=\"").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
            })
    });
    number && name_ok && labels_ok
}

impl Metrics {
    /// The value of the gauge, counter or untyped sample `name` with (at least) `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| s.metric == name)
            .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    }
}
