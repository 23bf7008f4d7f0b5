//! `requirements.txt` as sprout accepts it: one requirement per line (a name, extras,
//! a version specifier, an environment marker), comments and blank lines. Anything
//! that changes where packages come from (options such as `--index-url`,
//! `--extra-index-url`, `-f`, `-e`, `-r`, `-c`; URLs, VCS references and local
//! paths) is refused, naming the line: every package comes from the one index the
//! node's installer uses, so that a cached package is what that index serves.

use super::error::Error;

/// The largest `requirements.txt` read.
pub const MAX_BYTES: usize = 64 << 10;
/// At most this many requirement lines.
pub const MAX_LINES: usize = 256;
/// The longest requirement line.
const MAX_LINE: usize = 512;

/// The requirement lines of `text`, trimmed, without comments or blank lines; an
/// empty list when there are none.
pub fn parse(text: &str) -> Result<Vec<String>, Error> {
    if text.len() > MAX_BYTES {
        return Err(Error::Requirements {
            line: 0,
            text: String::new(),
            problem: format!("the file is larger than {MAX_BYTES} bytes"),
        });
    }
    let mut lines = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let refuse = |problem: &str| Error::Requirements {
            line,
            text: raw.chars().take(120).collect(),
            problem: problem.to_owned(),
        };
        // A comment starts at `#` at the start or after whitespace (pip's rule).
        let without_comment = match raw.find(" #").or_else(|| raw.find("\t#")) {
            Some(i) => &raw[..i],
            None if raw.trim_start().starts_with('#') => "",
            None => raw,
        };
        let req = without_comment.trim();
        if req.is_empty() {
            continue;
        }
        if req.len() > MAX_LINE {
            return Err(refuse(&format!("the line is longer than {MAX_LINE} bytes")));
        }
        if req.ends_with('\\') {
            return Err(refuse("line continuations are not accepted"));
        }
        if req.starts_with('-') {
            return Err(refuse(
                "pip options are not accepted: packages come only from the node's package index (no --index-url, --extra-index-url, -f/--find-links, -e, -r or -c)",
            ));
        }
        if let Some(problem) = check_requirement(req) {
            return Err(refuse(&problem));
        }
        lines.push(req.to_owned());
        if lines.len() > MAX_LINES {
            return Err(refuse(&format!("more than {MAX_LINES} requirements")));
        }
    }
    Ok(lines)
}

/// Why `req` (one trimmed requirement) is refused, if it is.
fn check_requirement(req: &str) -> Option<String> {
    let (spec, _marker) = match req.split_once(';') {
        Some((spec, marker)) => (spec.trim(), Some(marker)),
        None => (req, None),
    };
    if spec.contains('@') || spec.contains("://") {
        return Some(
            "direct references (`name @ URL`, URLs, VCS) are not accepted: name a package of the index with a version specifier".into(),
        );
    }
    if spec.starts_with('.') || spec.starts_with('/') || spec.starts_with('~') {
        return Some("local paths are not accepted: name a package of the index".into());
    }
    let name_end = spec
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(spec.len());
    let name = &spec[..name_end];
    if name.is_empty()
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Some(
            "a requirement starts with a package name (letters, digits, '-', '_', '.')".into(),
        );
    }
    let rest = spec[name_end..].trim_start();
    let rest = match rest.strip_prefix('[') {
        Some(extras) => {
            let Some((list, after)) = extras.split_once(']') else {
                return Some("extras are not closed with ']'".into());
            };
            if !list.split(',').all(|e| {
                let e = e.trim();
                !e.is_empty()
                    && e.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            }) {
                return Some("extras are names separated by ','".into());
            }
            after.trim_start()
        }
        None => rest,
    };
    if rest.is_empty() {
        return None;
    }
    // Version specifiers: `op version` separated by ','.
    for clause in rest.split(',') {
        let clause = clause.trim();
        let op_len = clause
            .find(|c: char| !matches!(c, '=' | '<' | '>' | '!' | '~'))
            .unwrap_or(clause.len());
        let (op, version) = clause.split_at(op_len);
        if !matches!(op, "==" | "!=" | "<=" | ">=" | "<" | ">" | "~=" | "===") {
            return Some(format!(
                "{clause:?} is not a version specifier (==, !=, <=, >=, <, >, ~=)"
            ));
        }
        let version = version.trim();
        if version.is_empty()
            || !version.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '*' | '+' | '!' | '-' | '_')
            })
        {
            return Some(format!("{clause:?} does not name a version"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_specifiers_extras_markers_and_comments() {
        let text = "# pinned by pip-compile\nnumpy==2.1.3\n\njinja2>=2.10.3  # templating\n\
                    requests[socks, security] >=2.0,<3\npyaes\nfoo.bar_baz~=1.4 ; python_version >= \"3.8\"\n";
        assert_eq!(
            parse(text).unwrap(),
            [
                "numpy==2.1.3",
                "jinja2>=2.10.3",
                "requests[socks, security] >=2.0,<3",
                "pyaes",
                "foo.bar_baz~=1.4 ; python_version >= \"3.8\"",
            ]
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse("# nothing\n\n").unwrap().is_empty());
    }

    #[test]
    fn refuses_what_changes_where_packages_come_from_naming_the_line() {
        for (text, want) in [
            ("numpy\n--index-url https://evil/simple\n", "pip options"),
            ("--extra-index-url=https://evil\n", "pip options"),
            ("-f /tmp/wheels\n", "pip options"),
            ("-e .\n", "pip options"),
            ("-r other.txt\n", "pip options"),
            ("pkg @ https://evil/pkg.whl\n", "direct references"),
            ("git+https://github.com/x/y\n", "direct references"),
            ("https://evil/pkg.tar.gz\n", "direct references"),
            ("./local/pkg\n", "local paths"),
            ("/abs/pkg.whl\n", "local paths"),
            ("numpy=1\n", "version specifier"),
            ("numpy==\n", "does not name a version"),
            ("numpy \\\n", "continuations"),
            ("[x]\n", "package name"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains("requirements.txt line"), "{text:?}: {e}");
        }
        let e = parse("numpy\n--index-url x\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn bounds_size_and_count() {
        assert!(parse(&"a\n".repeat(MAX_BYTES)).is_err());
        let many: String = (0..=MAX_LINES).map(|i| format!("p{i}\n")).collect();
        assert!(parse(&many).unwrap_err().to_string().contains("more than"));
        assert!(parse(&format!("a=={}\n", "1".repeat(600))).is_err());
    }
}
