//! A strict parser of the Prometheus text exposition format (what node-exporter's textfile
//! collector reads), for checking the metrics files we write: any deviation is an error.

use std::collections::{BTreeMap, BTreeSet};

/// One sample: family name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of the textfile `file`; panics (showing it) if it cannot be read or does not parse.
pub fn read(file: &std::path::Path) -> Vec<Sample> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    parse(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", file.display()))
}

/// The value of `name{user="USER"}`; panics if there is none.
pub fn user_value(samples: &[Sample], name: &str, user: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get("user").map(String::as_str) == Some(user))
        .unwrap_or_else(|| panic!("no {name}{{user=\"{user}\"}} in {samples:?}"))
        .value
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':') && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse::<f64>().map_err(|_| format!("bad value {s:?}")),
    }
}

/// `{a="x",b="y"}` (after the name) → labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("newline in label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses `text`, enforcing: HELP and TYPE at most once per family and before its samples, a
/// known type, each family's samples contiguous, no series twice, a trailing newline.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("no newline at the end".into());
    }
    let (mut samples, mut helped, mut typed, mut finished) = (Vec::new(), BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut series = BTreeSet::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        let mut switch_to = |name: &str, current: &mut Option<String>| -> Result<(), String> {
            if current.as_deref() != Some(name) {
                if finished.contains(name) {
                    return Err(format!("family {name} is not contiguous"));
                }
                if let Some(c) = current.take() {
                    finished.insert(c);
                }
                *current = Some(name.to_string());
            }
            Ok(())
        };
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let words: Vec<&str> = c.trim_start().splitn(3, ' ').collect();
            match words.as_slice() {
                ["HELP", name, _] | ["HELP", name] => {
                    if !is_metric_name(name) || !helped.insert(name.to_string()) {
                        return Err(err("bad or repeated HELP".into()));
                    }
                    if samples.iter().any(|s: &Sample| s.name == *name) {
                        return Err(err("HELP after samples".into()));
                    }
                    switch_to(name, &mut current).map_err(err)?;
                }
                ["TYPE", name, kind] => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(kind) || !typed.insert(name.to_string()) {
                        return Err(err("bad or repeated TYPE".into()));
                    }
                    if samples.iter().any(|s: &Sample| s.name == *name) {
                        return Err(err("TYPE after samples".into()));
                    }
                    switch_to(name, &mut current).map_err(err)?;
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') { parse_labels(&line[name_end..]).map_err(err)? } else { (BTreeMap::new(), &line[name_end..]) };
        let fields: Vec<&str> = rest.strip_prefix(' ').ok_or_else(|| err("no space before the value".into()))?.split(' ').collect();
        if fields.is_empty() || fields.len() > 2 || fields.iter().any(|f| f.is_empty()) {
            return Err(err("expected a value and an optional timestamp".into()));
        }
        let value = parse_value(fields[0]).map_err(err)?;
        if fields.len() == 2 {
            fields[1].parse::<i64>().map_err(|_| err("bad timestamp".into()))?;
        }
        switch_to(name, &mut current).map_err(err)?;
        if !series.insert((name.to_string(), labels.clone().into_iter().collect::<Vec<_>>())) {
            return Err(err("the same series twice".into()));
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}
