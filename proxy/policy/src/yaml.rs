//! A small YAML tree with positions, built from `saphyr-parser` events, and the helpers that
//! decode it strictly (unknown keys, wrong types and nulls are errors at the node's position).
//!
//! Policy files are read with it, and so are the CA's mesh files (`meshid-ca apply -f`), so
//! that both refuse the same things with the same messages. Only what such files need: one
//! document of mappings, sequences and scalars. Anchors, aliases and tags are refused (they
//! make files harder to review and aliases allow exponential expansion); so are duplicate keys,
//! nesting deeper than [`Limits::depth`] and more than [`Limits::nodes`] nodes.

use saphyr_parser::{Event, Parser, Span};

pub use saphyr_parser::ScalarStyle;

use crate::PolicyError;

/// How large a document [`parse_limited`] accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Deepest nesting of sequences and mappings.
    pub depth: usize,
    /// Most nodes in the document.
    pub nodes: usize,
    /// What the file is, for the messages ("a policy needs far fewer").
    pub what: &'static str,
}

/// The limits of a policy file.
pub const POLICY_LIMITS: Limits = Limits {
    depth: 32,
    nodes: 200_000,
    what: "a policy",
};

/// A position in the source: line and column, both from 1 (columns in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    /// The line, from 1.
    pub line: usize,
    /// The column in characters, from 1.
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
pub struct Node {
    /// Where it starts.
    pub pos: Pos,
    /// What it is.
    pub value: Value,
}

/// The three kinds of YAML node.
#[derive(Debug)]
pub enum Value {
    /// A scalar and how it was written (plain, quoted, literal or folded block).
    Scalar(String, ScalarStyle),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order (keys are scalars, no two alike).
    Map(Vec<(Node, Node)>),
}

/// Names the file in errors.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// The file name used in messages.
    pub origin: &'a str,
}

impl Ctx<'_> {
    /// A validation error at `pos`.
    pub fn invalid(&self, pos: Pos, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            origin: self.origin.to_owned(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        }
    }

    /// A syntax error at `pos`.
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

/// Parses `text` as exactly one YAML document, with the limits of a policy file.
pub(crate) fn parse_document(text: &str, ctx: Ctx<'_>) -> Result<Node, PolicyError> {
    parse_limited(text, ctx, POLICY_LIMITS)?.ok_or_else(|| {
        ctx.invalid(
            Pos { line: 1, column: 1 },
            "the file is empty: write a mapping with at least `rules:`",
        )
    })
}

/// Parses `text` as at most one YAML document (`None` when there is none).
///
/// # Errors
///
/// [`PolicyError::Syntax`] for YAML that is not well-formed, a second document, or a document
/// past `limits`; [`PolicyError::Invalid`] for anchors, aliases, tags and duplicate keys. The
/// position is within the text, even where the parser points past its end.
pub fn parse_limited(
    text: &str,
    ctx: Ctx<'_>,
    limits: Limits,
) -> Result<Option<Node>, PolicyError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut nodes = 0usize;
    let last_line = lines(text).count().max(1);
    while let Some(event) = parser.next_event() {
        let (event, span) = event.map_err(|e| {
            ctx.syntax(
                within(
                    text,
                    Pos {
                        line: e.marker().line(),
                        column: e.marker().col() + 1,
                    },
                ),
                format!("invalid YAML: {}", e.info()),
            )
        })?;
        let mut pos = Pos::of(span);
        if pos.line > last_line {
            // An empty document after `---` at the end of a file without a final line break.
            pos = within(text, pos);
        }
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
                    value: Value::Scalar(text.into_owned(), style),
                }
            }
            Event::SequenceStart(anchor, tag) => {
                refuse_anchor_and_tag(ctx, pos, anchor, tag.is_some())?;
                check_depth(ctx, pos, &stack, limits)?;
                stack.push(Frame::Seq(pos, Vec::new()));
                continue;
            }
            Event::MappingStart(anchor, tag) => {
                refuse_anchor_and_tag(ctx, pos, anchor, tag.is_some())?;
                check_depth(ctx, pos, &stack, limits)?;
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
        if nodes > limits.nodes {
            return Err(ctx.syntax(
                node.pos,
                format!(
                    "more than {} YAML nodes: {} needs far fewer",
                    limits.nodes, limits.what
                ),
            ));
        }
        push(&mut stack, &mut root, node, ctx)?;
    }
    Ok(root)
}

/// `pos`, or the end of the text when the parser points past it (an error at the end of a
/// file that does not end with a line break).
fn within(text: &str, pos: Pos) -> Pos {
    let last = lines(text).count().max(1);
    if pos.line <= last {
        return pos;
    }
    let column = lines(text).last().map_or(0, |l| l.chars().count()) + 1;
    Pos { line: last, column }
}

/// The lines of `text` as YAML counts them (a line ends at `\n`, `\r\n` or a lone `\r`), so
/// that line numbers agree with the parser's.
pub fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .flat_map(|l| l.strip_suffix('\r').unwrap_or(l).split('\r'))
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

fn check_depth(ctx: Ctx<'_>, pos: Pos, stack: &[Frame], limits: Limits) -> Result<(), PolicyError> {
    if stack.len() >= limits.depth {
        return Err(ctx.syntax(
            pos,
            format!(
                "nesting deeper than {} levels: {} needs far fewer; check the indentation",
                limits.depth, limits.what
            ),
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
        matches!(&self.value, Value::Scalar(s, ScalarStyle::Plain) if matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
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
            Value::Scalar(s, ScalarStyle::Plain) => match s.parse::<u16>() {
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
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(61) {
        Some((end, _)) if s.chars().nth(64).is_some() => format!("{}...", &s[..end]).into(),
        _ => s.into(),
    }
}

/// The text of a scalar (keys are always scalars); empty for a list or mapping.
pub fn scalar_text(node: &Node) -> &str {
    match &node.value {
        Value::Scalar(s, _) => s,
        _ => "",
    }
}

/// The entries of a mapping whose keys were checked.
pub struct Fields<'n> {
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
