//! The repository's Markdown: every relative link and `#anchor` in every `.md` file resolves,
//! so a moved page or a renamed heading fails a test instead of leaving a dead link. Parsed
//! with `pulldown-cmark` (links inside tables, lists and headings included; code is not a
//! link); anchors follow GitHub's heading slugs. External links (any URL with a scheme) are
//! not checked. Needs no `bff` binary.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

/// Directories no tracked Markdown lives in: build output and git's own.
const SKIPPED_DIRS: &[&str] = &["target", ".git"];

#[test]
fn every_relative_link_and_anchor_in_the_repository_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = markdown_files(root);
    assert!(
        files.iter().any(|f| f.ends_with("README.md")),
        "no README.md found under {}: the walk is broken",
        root.display()
    );
    let broken = broken_links(root, &files);
    assert!(
        broken.is_empty(),
        "{} broken relative link(s) in the Markdown:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn the_checker_names_a_missing_file_and_a_missing_anchor() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    fs::create_dir(root.join("docs")).expect("mkdir docs");
    fs::write(
        root.join("README.md"),
        "# Top\n\nSee [the cache](docs/cache.md#layers), [gone](docs/gone.md), \
         [bad anchor](docs/cache.md#no-such-heading), [self](#top), [self bad](#nope), \
         [a dir](docs), [web](https://example.com/x.md#y), [mail](mailto:a@b.c).\n\n\
         | a | b |\n|---|---|\n| [in a table](docs/missing-too.md) | x |\n\n\
         `[not a link](docs/in-code.md)`\n",
    )
    .expect("write README");
    fs::write(
        root.join("docs/cache.md"),
        "# Cache\n\n## Layers\n\n## Layers\n\n[up](../README.md#top) [second](#layers-1) \
         [third](#layers-2)\n",
    )
    .expect("write cache.md");

    let files = markdown_files(root);
    assert_eq!(files.len(), 2, "found {files:?}");
    let broken = broken_links(root, &files);
    let expected = [
        "README.md: [gone](docs/gone.md): no file docs/gone.md",
        "README.md: [bad anchor](docs/cache.md#no-such-heading): no heading #no-such-heading in docs/cache.md",
        "README.md: [self bad](#nope): no heading #nope in README.md",
        "README.md: [in a table](docs/missing-too.md): no file docs/missing-too.md",
        "docs/cache.md: [third](#layers-2): no heading #layers-2 in docs/cache.md",
    ];
    assert_eq!(broken, expected);
}

#[test]
fn heading_slugs_follow_github() {
    let slugs = heading_slugs(
        "# `bff inject`: add the sidecar\n\
         ## Rate limits, failed authentications and the client address\n\
         ## Auth and credentials\n\
         ## Auth and credentials\n\
         ## snake_case and kebab-case (v2.0)\n\
         ## A [linked](x.md) *word*\n",
    );
    assert_eq!(
        slugs,
        [
            "bff-inject-add-the-sidecar",
            "rate-limits-failed-authentications-and-the-client-address",
            "auth-and-credentials",
            "auth-and-credentials-1",
            "snake_case-and-kebab-case-v20",
            "a-linked-word",
        ]
    );
}

/// Every `.md` file under `root`, relative to it, sorted, outside [`SKIPPED_DIRS`].
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() {
                if !SKIPPED_DIRS.contains(&name) {
                    dirs.push(path);
                }
            } else if name.ends_with(".md") {
                found.push(path.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// One line per link in `files` (relative to `root`) whose target file or `#anchor` does not
/// exist: `FILE: [TEXT](DEST): why`.
fn broken_links(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut slugs_of: HashMap<PathBuf, Vec<String>> = HashMap::new();
    let mut broken = Vec::new();
    for file in files {
        let text = read(&root.join(file));
        for (label, dest) in links(&text) {
            if has_scheme(&dest) {
                continue;
            }
            let (path_part, anchor) = match dest.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (dest.as_str(), None),
            };
            // A query string means nothing to a file on disk.
            let path_part = path_part.split('?').next().unwrap_or_default();
            let target = if path_part.is_empty() {
                file.clone()
            } else if let Some(from_root) = path_part.strip_prefix('/') {
                normalise(Path::new(from_root))
            } else {
                normalise(&file.parent().unwrap_or(Path::new("")).join(path_part))
            };
            let report = |why: String| format!("{}: [{label}]({dest}): {why}", file.display());
            let on_disk = root.join(&target);
            if !on_disk.exists() {
                broken.push(report(format!("no file {}", target.display())));
                continue;
            }
            let Some(anchor) = anchor.filter(|a| !a.is_empty()) else {
                continue;
            };
            // GitHub shows a directory's README.md, so an anchor on a directory is into it.
            let page = if on_disk.is_dir() {
                target.join("README.md")
            } else {
                target
            };
            let slugs = slugs_of.entry(page.clone()).or_insert_with(|| {
                if page.extension().is_some_and(|e| e == "md") && root.join(&page).is_file() {
                    heading_slugs(&read(&root.join(&page)))
                } else {
                    Vec::new()
                }
            });
            if !slugs.iter().any(|s| s == anchor) {
                broken.push(report(format!(
                    "no heading #{anchor} in {}",
                    page.display()
                )));
            }
        }
    }
    broken
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parser(text: &str) -> Parser<'_> {
    Parser::new_ext(
        text,
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_FOOTNOTES,
    )
}

/// `(text, destination)` of every link and image, reference-style ones resolved.
fn links(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut open: Option<(String, String)> = None;
    for event in parser(text) {
        match event {
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                open = Some((String::new(), dest_url.to_string()));
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some((label, _)) = open.as_mut() {
                    label.push_str(&t);
                }
            }
            Event::End(TagEnd::Link | TagEnd::Image) => found.extend(open.take()),
            _ => {}
        }
    }
    found
}

/// The anchors GitHub gives the headings of `text`, in order: the heading's text lower-cased,
/// each space a `-`, every other character but letters, digits, `-` and `_` dropped; a repeated
/// slug gets `-1`, `-2`, ….
fn heading_slugs(text: &str) -> Vec<String> {
    let mut slugs = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut heading: Option<String> = None;
    for event in parser(text) {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let Some(h) = heading.take() else { continue };
                let base: String = h
                    .trim()
                    .to_lowercase()
                    .chars()
                    .filter_map(|c| match c {
                        ' ' => Some('-'),
                        c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                        _ => None,
                    })
                    .collect();
                let n = seen.entry(base.clone()).or_insert(0);
                slugs.push(if *n == 0 { base } else { format!("{base}-{n}") });
                *n += 1;
            }
            _ => {}
        }
    }
    slugs
}

/// `http:`, `https:`, `mailto:` and any other `scheme:` before the first `/`, `?` or `#`.
fn has_scheme(dest: &str) -> bool {
    let end = dest.find(['/', '?', '#']).unwrap_or(dest.len());
    dest[..end].contains(':')
}

/// `a/./b/../c` → `a/c`, without touching the disk (a link may point at a missing file).
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}
