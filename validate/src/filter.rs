//! Which probe points to record: a layer range and simple glob patterns.

use crate::Error;
use std::ops::Range;

/// `*` matches any run of characters (dots included), `?` one character; everything else literally.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Parses a layer range: `2` (one layer), `0..3` (end excluded), `0..=3`, `2..` (to the end).
pub fn parse_layers(text: &str) -> Result<Range<usize>, Error> {
    let bad = || {
        Error::Options(format!(
            "invalid layer range `{text}` (expected N, A..B, A..=B or A..)"
        ))
    };
    let t = text.trim();
    if let Some((a, b)) = t.split_once("..") {
        let start = if a.is_empty() {
            0
        } else {
            a.parse().map_err(|_| bad())?
        };
        let end = if let Some(b) = b.strip_prefix('=') {
            b.parse::<usize>().map_err(|_| bad())? + 1
        } else if b.is_empty() {
            usize::MAX
        } else {
            b.parse().map_err(|_| bad())?
        };
        if end < start {
            return Err(bad());
        }
        Ok(start..end)
    } else {
        let n: usize = t.parse().map_err(|_| bad())?;
        Ok(n..n + 1)
    }
}

/// A probe selection: per-layer probes inside `layers` (all when None) whose name matches one of
/// `patterns` (all when empty). Non-layer probes (`final.*`, `logits`) obey the patterns only.
#[derive(Debug, Clone, Default)]
pub struct ProbeFilter {
    pub layers: Option<Range<usize>>,
    pub patterns: Vec<String>,
}

impl ProbeFilter {
    /// From the CLI's `--layers` and comma-separated `--filter` values.
    pub fn parse(layers: Option<&str>, filter: Option<&str>) -> Result<Self, Error> {
        Ok(Self {
            layers: layers.map(parse_layers).transpose()?,
            patterns: filter
                .map(|f| {
                    f.split(',')
                        .map(|p| p.trim().to_string())
                        .filter(|p| !p.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    pub fn wants(&self, name: &str) -> bool {
        if let (Some(range), Some(layer)) = (&self.layers, crate::layer_of(name)) {
            if !range.contains(&layer) {
                return false;
            }
        }
        self.patterns.is_empty() || self.patterns.iter().any(|p| glob_match(p, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("layers.*.attn.core", "layers.12.attn.core"));
        assert!(glob_match("*router*", "layers.1.ffn.router.indices"));
        assert!(!glob_match("layers.?.attn.q", "layers.12.attn.q"));
        assert!(glob_match("layers.?.attn.q", "layers.2.attn.q"));
        assert!(glob_match("logits", "logits"));
        assert!(!glob_match("logits", "logits2"));
    }

    #[test]
    fn ranges_and_filters() {
        assert_eq!(parse_layers("0..3").unwrap(), 0..3);
        assert_eq!(parse_layers("1..=2").unwrap(), 1..3);
        assert_eq!(parse_layers("2").unwrap(), 2..3);
        assert!(parse_layers("x").is_err());
        let f = ProbeFilter::parse(Some("1..3"), Some("*.attn.*,logits")).unwrap();
        assert!(f.wants("layers.1.attn.q"));
        assert!(!f.wants("layers.3.attn.q"));
        assert!(!f.wants("layers.1.ffn.output"));
        assert!(f.wants("logits"));
    }
}
