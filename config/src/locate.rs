//! Finds the line of a key path (`wireguard_peers[1].allowed_ips`) in block-style YAML text, so
//! errors found after parsing can still point at a line. Flow-style values (`[a, b]`) resolve to
//! the line of their key.

/// One step of a key path.
#[derive(Debug, PartialEq)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Step::Key(key));
        }
        while let Some((idx, after)) = rest.split_once(']') {
            if let Ok(i) = idx.parse() {
                out.push(Step::Index(i));
            }
            rest = after.strip_prefix('[').unwrap_or("");
        }
    }
    out
}

/// Column of the first meaningful character, or `None` for blank and comment lines.
fn indent(line: &str) -> Option<usize> {
    let col = line.len() - line.trim_start().len();
    let rest = line.trim_start();
    (!rest.is_empty() && !rest.starts_with('#')).then_some(col)
}

/// Returns the 1-based `(line, column)` of the deepest part of `path` found in `text`.
pub(crate) fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let (mut start, mut end) = (0usize, lines.len());
    let mut parent: Option<usize> = None; // column of the enclosing key or dash
    let mut found = None;
    for step in steps(path) {
        let deeper = |col: usize| parent.is_none_or(|p| col > p);
        let hit = match step {
            Step::Key(key) => (start..end).find_map(|i| {
                let line = lines[i];
                let mut col = indent(line)?;
                let mut rest = &line[col..];
                while let Some(r) = rest.strip_prefix("- ") {
                    col += 2 + (r.len() - r.trim_start().len());
                    rest = r.trim_start();
                }
                (deeper(col) && rest.strip_prefix(key)?.starts_with(':')).then_some((i, col))
            }),
            Step::Index(n) => {
                let mut items = (start..end).filter_map(|i| {
                    let col = indent(lines[i])?;
                    (deeper(col) && lines[i][col..].starts_with('-')).then_some((i, col))
                });
                items.next().and_then(|first| {
                    std::iter::once(first)
                        .chain(items.filter(|&(_, c)| c == first.1))
                        .nth(n)
                })
            }
        };
        let Some((line, col)) = hit else { break };
        found = Some((line + 1, col + 1));
        parent = Some(col);
        end = (line + 1..lines.len())
            .find(|&i| indent(lines[i]).is_some_and(|c| c <= col))
            .unwrap_or(lines.len());
        // A list item's first key sits on the dash's own line; a key's value starts below it.
        start = if matches!(step, Step::Index(_)) {
            line
        } else {
            line + 1
        };
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
node:
  name: a
network:
  pod_network_cidr: 100.64.0.0/16
wireguard_peers:
  - name: one
    allowed_ips: [100.64.1.0/24]
  - name: two
    # a comment
    allowed_ips:
      - 100.64.2.0/24
      - 100.64.3.0/24
";

    #[test]
    fn finds_nested_keys_and_list_items() {
        assert_eq!(locate(TEXT, "node.name"), Some((2, 3)));
        assert_eq!(locate(TEXT, "network.pod_network_cidr"), Some((4, 3)));
        assert_eq!(locate(TEXT, "wireguard_peers[0].allowed_ips"), Some((7, 5)));
        assert_eq!(locate(TEXT, "wireguard_peers[1].name"), Some((8, 5)));
        assert_eq!(
            locate(TEXT, "wireguard_peers[1].allowed_ips[1]"),
            Some((12, 7))
        );
    }

    #[test]
    fn missing_parts_fall_back_to_the_deepest_found() {
        assert_eq!(
            locate(TEXT, "wireguard_peers[0].allowed_ips[0]"),
            Some((7, 5))
        );
        assert_eq!(locate(TEXT, "router.port"), None);
    }
}
