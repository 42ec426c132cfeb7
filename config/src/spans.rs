//! Where a key is in the file: a problem's key path (`pool[0].backend[1].addr`) mapped to its
//! line, so `check-config` can point at it like a compiler. The validation works on serde
//! structs, which forget positions; the file is parsed a second time, with spans, only when
//! there is something to report.

use toml::de::{DeTable, DeValue};

/// One step of a key path: a key, and the index into its array of tables, if any.
fn steps(path: &str) -> Vec<(&str, Option<usize>)> {
    path.split('.')
        .map(|step| match step.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse().ok()),
            None => (step, None),
        })
        .collect()
}

/// The 1-based line of `path` in `text`: where its last key that exists is written (a key the
/// file leaves out points at the table it belongs in). `None` when not even the first key is
/// in the file (a default, or the file as a whole).
pub(crate) fn line_of(text: &str, path: &str) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut found: Option<usize> = None;
    for (key, index) in steps(path) {
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == key) else {
            break;
        };
        found = Some(k.span().start);
        let value = match (v.get_ref(), index) {
            (DeValue::Array(items), Some(i)) => match items.get(i) {
                Some(item) => {
                    found = Some(item.span().start);
                    item.get_ref()
                }
                None => break,
            },
            (other, _) => other,
        };
        match value {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    found.map(|offset| line_at(text, offset))
}

/// The 1-based line of byte `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
[lb]
admin = \"127.0.0.1:9883\"

[[pool]]
name = \"a\"
[[pool.backend]]
id = \"a1\"
addr = \"x\"

[[pool]]
name = \"b\"
[[pool.backend]]
id = \"b1\"
[[pool.backend]]
id = \"b2\"
addr = \"nowhere\"
weight = 0

[[rule]]
name = \"r\"
";

    #[test]
    fn a_key_path_points_at_its_line() {
        assert_eq!(line_of(FILE, "lb.admin"), Some(2));
        assert_eq!(line_of(FILE, "pool[0].backend[0].addr"), Some(8));
        assert_eq!(line_of(FILE, "pool[1].name"), Some(11));
        assert_eq!(line_of(FILE, "pool[1].backend[1].addr"), Some(16));
        assert_eq!(line_of(FILE, "pool[1].backend[1].weight"), Some(17));
    }

    #[test]
    fn a_key_left_out_points_at_its_table() {
        // rule[0] has no pool: the line of its table
        let line = line_of(FILE, "rule[0].pool").expect("a line");
        assert!((19..=20).contains(&line), "{line}");
        let line = line_of(FILE, "pool[1].backend[0].addr").expect("a line");
        assert!((12..=13).contains(&line), "{line}");
    }

    #[test]
    fn a_key_not_in_the_file_has_no_line() {
        assert_eq!(line_of(FILE, "cluster.secret"), None);
        assert_eq!(line_of("not = [toml", "lb.admin"), None);
    }
}
