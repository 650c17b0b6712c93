//! A small YAML tree with positions, built from `saphyr-parser` events, and the helpers that
//! decode it strictly (unknown keys, wrong types and nulls are errors at the node's position).
//!
//! Only what policy files need: one document of mappings, sequences and scalars. Anchors,
//! aliases and tags are refused (they make files harder to review and aliases allow exponential
//! expansion); so are duplicate keys, nesting deeper than [`MAX_DEPTH`] and more than
//! [`MAX_NODES`] nodes.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::PolicyError;

/// Deepest nesting of sequences and mappings accepted.
pub(crate) const MAX_DEPTH: usize = 32;
/// Most nodes accepted in one document.
pub(crate) const MAX_NODES: usize = 200_000;

/// A position in the source: line and column, both from 1 (columns in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(span: Span) -> Self {
        Self {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// A YAML node and where it starts.
#[derive(Debug)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// The three kinds of YAML node.
#[derive(Debug)]
pub(crate) enum Value {
    /// A scalar and whether it was written plain (unquoted, not a block scalar).
    Scalar(String, bool),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// Names the file in errors.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub origin: &'a str,
}

impl Ctx<'_> {
    pub fn invalid(&self, pos: Pos, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            origin: self.origin.to_owned(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        }
    }

    pub fn syntax(&self, pos: Pos, message: impl Into<String>) -> PolicyError {
        PolicyError::Syntax {
            origin: self.origin.to_owned(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        }
    }
}

enum Frame {
    Seq(Pos, Vec<Node>),
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
}

/// Parses `text` as exactly one YAML document.
pub(crate) fn parse_document(text: &str, ctx: Ctx<'_>) -> Result<Node, PolicyError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut nodes = 0usize;
    while let Some(event) = parser.next_event() {
        let (event, span) = event.map_err(|e| {
            ctx.syntax(
                Pos {
                    line: e.marker().line(),
                    column: e.marker().col() + 1,
                },
                format!("invalid YAML: {}", e.info()),
            )
        })?;
        let pos = Pos::of(span);
        let node = match event {
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => continue,
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(ctx.syntax(
                        pos,
                        "only one YAML document is allowed: remove the second `---` and what \
                         follows, or put it in its own file",
                    ));
                }
                continue;
            }
            Event::Alias(_) => {
                return Err(ctx.invalid(
                    pos,
                    "aliases (`*name`) are not supported: write the value out in full",
                ));
            }
            Event::Scalar(text, style, anchor, tag) => {
                refuse_anchor_and_tag(ctx, pos, anchor, tag.is_some())?;
                Node {
                    pos,
                    value: Value::Scalar(text.into_owned(), style == ScalarStyle::Plain),
                }
            }
            Event::SequenceStart(anchor, tag) => {
                refuse_anchor_and_tag(ctx, pos, anchor, tag.is_some())?;
                check_depth(ctx, pos, &stack)?;
                stack.push(Frame::Seq(pos, Vec::new()));
                continue;
            }
            Event::MappingStart(anchor, tag) => {
                refuse_anchor_and_tag(ctx, pos, anchor, tag.is_some())?;
                check_depth(ctx, pos, &stack)?;
                stack.push(Frame::Map(pos, Vec::new(), None));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(pos, items)) => Node {
                    pos,
                    value: Value::Seq(items),
                },
                Some(Frame::Map(pos, entries, _)) => Node {
                    pos,
                    value: Value::Map(entries),
                },
                None => return Err(ctx.syntax(pos, "invalid YAML: unbalanced end of a collection")),
            },
        };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(ctx.syntax(
                node.pos,
                format!("more than {MAX_NODES} YAML nodes: a policy needs far fewer"),
            ));
        }
        push(&mut stack, &mut root, node, ctx)?;
    }
    root.ok_or_else(|| {
        ctx.invalid(
            Pos { line: 1, column: 1 },
            "the file is empty: write a mapping with at least `rules:`",
        )
    })
}

fn refuse_anchor_and_tag(
    ctx: Ctx<'_>,
    pos: Pos,
    anchor: usize,
    tagged: bool,
) -> Result<(), PolicyError> {
    if anchor != 0 {
        return Err(ctx.invalid(
            pos,
            "anchors (`&name`) are not supported: write each value out in full",
        ));
    }
    if tagged {
        return Err(ctx.invalid(pos, "YAML tags (`!tag`) are not supported: remove the tag"));
    }
    Ok(())
}

fn check_depth(ctx: Ctx<'_>, pos: Pos, stack: &[Frame]) -> Result<(), PolicyError> {
    if stack.len() >= MAX_DEPTH {
        return Err(ctx.syntax(
            pos,
            format!("nesting deeper than {MAX_DEPTH} levels: a policy needs far fewer; check the indentation"),
        ));
    }
    Ok(())
}

fn push(
    stack: &mut [Frame],
    root: &mut Option<Node>,
    node: Node,
    ctx: Ctx<'_>,
) -> Result<(), PolicyError> {
    match stack.last_mut() {
        None => {
            *root = Some(node);
            Ok(())
        }
        Some(Frame::Seq(_, items)) => {
            items.push(node);
            Ok(())
        }
        Some(Frame::Map(_, entries, pending)) => match pending.take() {
            Some(key) => {
                entries.push((key, node));
                Ok(())
            }
            None => {
                let Value::Scalar(name, _) = &node.value else {
                    return Err(ctx.invalid(
                        node.pos,
                        "a mapping key must be a plain name or number, not a list or mapping",
                    ));
                };
                if let Some((first, _)) = entries
                    .iter()
                    .find(|(k, _)| matches!(&k.value, Value::Scalar(n, _) if n == name))
                {
                    return Err(ctx.invalid(
                        node.pos,
                        format!(
                            "duplicate key `{}` (first on line {}): keep one of them",
                            clip(name),
                            first.pos.line
                        ),
                    ));
                }
                *pending = Some(node);
                Ok(())
            }
        },
    }
}

impl Node {
    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(_, _) if self.is_null() => "nothing (null)",
            Value::Scalar(_, _) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// A plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s, true) if matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }
}

impl Ctx<'_> {
    /// The entries of a mapping, refusing keys not in `allowed`.
    pub fn fields<'n>(
        &self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Result<Fields<'n>, PolicyError> {
        let Value::Map(entries) = &node.value else {
            return Err(self.invalid(
                node.pos,
                format!(
                    "expected {what} (a mapping of {}), found {}",
                    allowed.join(", "),
                    node.kind()
                ),
            ));
        };
        for (key, _) in entries {
            let name = scalar_text(key);
            if !allowed.contains(&name) {
                return Err(self.invalid(
                    key.pos,
                    format!(
                        "unknown key `{name}` in {what}: expected one of {}",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(Fields { entries })
    }

    /// The entries of a mapping with any keys.
    pub fn map<'n>(&self, node: &'n Node, what: &str) -> Result<Fields<'n>, PolicyError> {
        match &node.value {
            Value::Map(entries) => Ok(Fields { entries }),
            _ => Err(self.invalid(node.pos, format!("expected {what}, found {}", node.kind()))),
        }
    }

    /// The items of a sequence.
    pub fn seq<'n>(&self, node: &'n Node, what: &str) -> Result<&'n [Node], PolicyError> {
        match &node.value {
            Value::Seq(items) => Ok(items),
            _ => Err(self.invalid(
                node.pos,
                format!(
                    "expected {what} as a list (`[a, b]` or `- a` lines), found {}",
                    node.kind()
                ),
            )),
        }
    }

    /// The text of a non-null scalar.
    pub fn str<'n>(&self, node: &'n Node, what: &str) -> Result<&'n str, PolicyError> {
        match &node.value {
            Value::Scalar(s, _) if !node.is_null() => Ok(s),
            _ => Err(self.invalid(node.pos, format!("expected {what}, found {}", node.kind()))),
        }
    }

    /// A port number: a plain integer from 1 to 65535.
    pub fn port(&self, node: &Node) -> Result<u16, PolicyError> {
        match &node.value {
            Value::Scalar(s, true) => match s.parse::<u16>() {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(self.invalid(
                    node.pos,
                    format!(
                        "`{}` is not a port: write a number from 1 to 65535",
                        clip(s)
                    ),
                )),
            },
            _ => Err(self.invalid(
                node.pos,
                format!(
                    "expected a port number from 1 to 65535 (unquoted), found {}",
                    node.kind()
                ),
            )),
        }
    }
}

/// User text for a message: at most 64 characters, so that a huge value does not flood it.
pub(crate) fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(61) {
        Some((end, _)) if s.chars().nth(64).is_some() => format!("{}...", &s[..end]).into(),
        _ => s.into(),
    }
}

/// The text of a scalar key (keys are always scalars, see `push`).
pub(crate) fn scalar_text(node: &Node) -> &str {
    match &node.value {
        Value::Scalar(s, _) => s,
        _ => "",
    }
}

/// The entries of a mapping whose keys were checked.
pub(crate) struct Fields<'n> {
    entries: &'n [(Node, Node)],
}

impl<'n> Fields<'n> {
    /// The value under `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| scalar_text(k) == key)
            .map(|(_, v)| v)
    }

    /// The key node and value under `key`, if present.
    pub fn entry(&self, key: &str) -> Option<(&'n Node, &'n Node)> {
        self.entries
            .iter()
            .find(|(k, _)| scalar_text(k) == key)
            .map(|(k, v)| (k, v))
    }

    /// All entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&'n Node, &'n Node)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}
