//! Generic rendering: any family's message as text, from the templates its schema declares.
//!
//! Families declare how their messages read (`(ppu.schema.v1.display)`: a `summary`, a
//! `detail`, a `table`), how their fields' numbers are written (`(ppu.schema.v1.field).format`)
//! and which readings a technician looks at first (`FamilyOptions.key_reading`). This module is
//! the one engine that fills those templates; the grammar is documented beside the options in
//! `proto/ppu/schema/v1/options.proto`. Nothing here names a family.

use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, ReflectMessage, Value};

use crate::{Family, Schema};

// ---------------------------------------------------------------------------------------------
// Number formats.
// ---------------------------------------------------------------------------------------------

/// A number as typed: `150`, `2.5`, `0.05` (shortest round-trip form).
pub fn num(v: f64) -> String {
    format!("{v}")
}

/// A measured value with at most `decimals` decimals, trailing zeros dropped.
pub fn measured(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_owned()
        } else {
            s.to_owned()
        }
    } else {
        s
    }
}

/// As [`measured`], but values below 1e-3 that are not 0 in scientific notation (`2.0e-5`):
/// plain decimals would hide a vacuum.
pub fn measured_sci(v: f64, decimals: usize) -> String {
    if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.1e}")
    } else {
        measured(v, decimals)
    }
}

/// A physical duration: `45 s`, `1 min 30 s`, `1 h`, `2 h 05 min`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return format!("{secs} s");
    }
    if secs < 0.0 {
        return format!("-{}", duration(-secs));
    }
    if secs < 60.0 {
        return format!("{} s", measured(secs, 1));
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    match (h, m, s) {
        (0, m, 0) => format!("{m} min"),
        (0, m, s) => format!("{m} min {s:02} s"),
        (h, 0, 0) => format!("{h} h"),
        (h, m, 0) => format!("{h} h {m:02} min"),
        (h, m, s) => format!("{h} h {m:02} min {s:02} s"),
    }
}

/// A fraction as a signed percentage with a real minus sign: `−0.05 %`, `+1.20 %`, `0.00 %`.
pub fn signed_pct(fraction: f64) -> String {
    let pct = fraction * 100.0;
    let text = format!("{:.2}", pct.abs());
    if text.trim_start_matches(['0', '.']).is_empty() {
        "0.00 %".to_owned()
    } else if pct < 0.0 {
        format!("−{text} %")
    } else {
        format!("+{text} %")
    }
}

/// Rows as a left-aligned table with a header, columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            l.push_str(cell);
            if i + 1 < widths.len() {
                let pad = w.saturating_sub(cell.chars().count());
                l.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A format SPEC: how a number is written and whether its unit follows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Spec {
    number: Number,
    nounit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum Number {
    #[default]
    Shortest,
    Fixed(usize),
    AtMost(usize),
    AtMostSci(usize),
    Duration,
    Pct,
}

impl Spec {
    /// Parses `~4e,nounit`; unknown tokens are ignored (an older ppuctl reads a newer family).
    fn parse(s: &str) -> Self {
        let mut spec = Spec::default();
        for token in s.split(',').map(str::trim) {
            let digits = |t: &str| t.parse::<usize>().ok();
            spec.number = match token {
                "" => continue,
                "nounit" => {
                    spec.nounit = true;
                    continue;
                }
                "duration" => Number::Duration,
                "pct" => Number::Pct,
                t if t.starts_with('.') => match digits(&t[1..]) {
                    Some(n) => Number::Fixed(n),
                    None => continue,
                },
                t if t.starts_with('~') && t.ends_with('e') => match digits(&t[1..t.len() - 1]) {
                    Some(n) => Number::AtMostSci(n),
                    None => continue,
                },
                t if t.starts_with('~') => match digits(&t[1..]) {
                    Some(n) => Number::AtMost(n),
                    None => continue,
                },
                _ => continue,
            };
        }
        spec
    }

    /// The number as text, and whether its unit may follow.
    fn number(&self, v: f64, int: bool) -> (String, bool) {
        match self.number {
            Number::Shortest if int => (format!("{}", v as i64), true),
            Number::Shortest => (num(v), true),
            Number::Fixed(n) => (format!("{v:.n$}"), true),
            Number::AtMost(n) => (measured(v, n), true),
            Number::AtMostSci(n) => (measured_sci(v, n), true),
            Number::Duration => (duration(v), false),
            Number::Pct => (signed_pct(v), false),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Values.
// ---------------------------------------------------------------------------------------------

/// A value a template can name.
#[derive(Debug, Clone)]
pub enum Val {
    /// Absent: an unset optional or message field, a reading not reported, `x / 0`.
    Unset {
        unit: String,
    },
    /// `set` is false for a proto3 scalar at its default (0).
    Num {
        v: f64,
        int: bool,
        set: bool,
        unit: String,
        format: String,
    },
    Bool(bool),
    Text(String),
    List {
        items: Vec<Val>,
        unit: String,
        format: String,
    },
    Msg(DynamicMessage),
}

impl Val {
    fn unset() -> Self {
        Val::Unset {
            unit: String::new(),
        }
    }

    fn number(v: f64) -> Self {
        Val::Num {
            v,
            int: false,
            set: v != 0.0,
            unit: String::new(),
            format: String::new(),
        }
    }

    /// `{?…}`: true, a set number, a non-empty text or list, a present message.
    fn truthy(&self) -> bool {
        match self {
            Val::Unset { .. } => false,
            Val::Num { set, .. } => *set,
            Val::Bool(b) => *b,
            Val::Text(s) => !s.is_empty(),
            Val::List { items, .. } => !items.is_empty(),
            Val::Msg(_) => true,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Num { v, .. } => Some(*v),
            Val::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            _ => None,
        }
    }

    fn text(&self, schema: &Schema, spec: Option<&str>) -> String {
        let with_unit = |text: String, unit: &str, allowed: bool, spec: &Spec| {
            if unit.is_empty() || !allowed || spec.nounit {
                text
            } else {
                format!("{text} {unit}")
            }
        };
        match self {
            Val::Unset { unit } => {
                let spec = Spec::parse(spec.unwrap_or(""));
                with_unit("?".to_owned(), unit, true, &spec)
            }
            Val::Num {
                v,
                int,
                unit,
                format,
                ..
            } => {
                let spec = Spec::parse(spec.unwrap_or(format));
                let (text, allowed) = spec.number(*v, *int);
                with_unit(text, unit, allowed, &spec)
            }
            Val::Bool(b) => b.to_string(),
            Val::Text(s) => s.clone(),
            Val::List {
                items,
                unit,
                format,
            } => {
                let spec = Spec::parse(spec.unwrap_or(format));
                let mut allowed = !items.is_empty();
                let parts: Vec<String> = items
                    .iter()
                    .map(|i| match i {
                        Val::Num { v, int, .. } => {
                            let (t, a) = spec.number(*v, *int);
                            allowed &= a;
                            t
                        }
                        other => other.text(schema, None),
                    })
                    .collect();
                with_unit(parts.join(", "), unit, allowed, &spec)
            }
            Val::Msg(m) => summary(schema, m),
        }
    }
}

/// Where a template's names are looked up: a message's fields, a device's readings.
pub trait Scope {
    /// The value `name` (a field, a oneof, or a whole dotted path the scope knows), or `None`.
    fn get(&self, schema: &Schema, name: &str) -> Option<Val>;
}

/// A message's fields and oneofs.
struct MessageScope<'a>(&'a DynamicMessage);

impl Scope for MessageScope<'_> {
    fn get(&self, schema: &Schema, name: &str) -> Option<Val> {
        let desc = self.0.descriptor();
        if let Some(field) = desc.get_field_by_name(name) {
            return Some(field_val(schema, self.0, &field));
        }
        let oneof = desc.oneofs().find(|o| o.name() == name)?;
        let set = oneof.fields().find(|f| self.0.has_field(f));
        Some(set.map_or_else(Val::unset, |f| field_val(schema, self.0, &f)))
    }
}

struct NoScope;

impl Scope for NoScope {
    fn get(&self, _: &Schema, _: &str) -> Option<Val> {
        None
    }
}

fn field_val(schema: &Schema, msg: &DynamicMessage, field: &FieldDescriptor) -> Val {
    let opts = schema.field_options(field);
    let value = msg.get_field(field);
    if let Value::List(items) = &*value {
        let items = items
            .iter()
            .map(|v| scalar(schema, field, v, true, &opts.unit, &opts.format))
            .collect();
        return Val::List {
            items,
            unit: opts.unit.clone(),
            format: opts.format.clone(),
        };
    }
    if matches!(field.kind(), Kind::Message(_)) && !msg.has_field(field) {
        return Val::Unset {
            unit: opts.unit.clone(),
        };
    }
    if field.supports_presence() && !msg.has_field(field) {
        return Val::Unset {
            unit: opts.unit.clone(),
        };
    }
    let set = msg.has_field(field);
    scalar(schema, field, &value, set, &opts.unit, &opts.format)
}

fn scalar(
    _schema: &Schema,
    field: &FieldDescriptor,
    v: &Value,
    set: bool,
    unit: &str,
    format: &str,
) -> Val {
    let n = |v: f64, int: bool| Val::Num {
        v,
        int,
        set,
        unit: unit.to_owned(),
        format: format.to_owned(),
    };
    match v {
        Value::F64(x) => n(*x, false),
        Value::F32(x) => n(f64::from(*x), false),
        Value::I32(x) => n(f64::from(*x), true),
        Value::I64(x) => n(*x as f64, true),
        Value::U32(x) => n(f64::from(*x), true),
        Value::U64(x) => n(*x as f64, true),
        Value::Bool(b) => Val::Bool(*b),
        Value::String(s) => Val::Text(s.clone()),
        Value::EnumNumber(e) => Val::Text(match field.kind() {
            Kind::Enum(en) => en
                .get_value(*e)
                .map_or_else(|| e.to_string(), |v| v.name().to_owned()),
            _ => e.to_string(),
        }),
        Value::Bytes(b) => Val::Text(format!("{} bytes", b.len())),
        Value::Message(m) => Val::Msg(m.clone()),
        Value::List(_) | Value::Map(_) => Val::unset(),
    }
}

/// Where names resolve while a template is filled.
struct Ctx<'a> {
    schema: &'a Schema,
    scope: &'a dyn Scope,
    /// `{.}`: the current item inside `{@…}`, or the message itself.
    this: Option<Val>,
    /// `#`: the current item's 1-based number.
    number: Option<usize>,
}

impl Ctx<'_> {
    fn path(&self, path: &str) -> Val {
        if path == "." {
            return self.this.clone().unwrap_or_else(Val::unset);
        }
        if let Some(v) = self.scope.get(self.schema, path) {
            return v;
        }
        let mut parts = path.split('.');
        let first = parts.next().unwrap_or_default();
        let Some(mut v) = self.scope.get(self.schema, first) else {
            return Val::unset();
        };
        for part in parts {
            v = match (&v, part) {
                (Val::List { items, .. }, "count") => Val::Num {
                    v: items.len() as f64,
                    int: true,
                    set: !items.is_empty(),
                    unit: String::new(),
                    format: String::new(),
                },
                (Val::List { items, .. }, "first") => {
                    items.first().cloned().unwrap_or_else(Val::unset)
                }
                (Val::List { items, .. }, "last") => {
                    items.last().cloned().unwrap_or_else(Val::unset)
                }
                (Val::Msg(m), name) => MessageScope(m)
                    .get(self.schema, name)
                    .unwrap_or_else(Val::unset),
                _ => Val::unset(),
            };
        }
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Expressions: paths, numbers, `#`, arithmetic and comparisons.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Path(String),
    Op(&'static str),
    Open,
    Close,
}

fn lex(s: &str) -> Vec<Tok> {
    const OPS: [&str; 10] = ["==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/"];
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while let Some(c) = rest.chars().next() {
        if c == '(' || c == ')' {
            out.push(if c == '(' { Tok::Open } else { Tok::Close });
            rest = &rest[1..];
        } else if let Some(op) = OPS.iter().find(|op| rest.starts_with(**op)) {
            out.push(Tok::Op(op));
            rest = &rest[op.len()..];
        } else if c.is_ascii_digit() {
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e'))
                .unwrap_or(rest.len());
            out.push(Tok::Num(rest[..end].parse().unwrap_or(f64::NAN)));
            rest = &rest[end..];
        } else if c == '#' {
            out.push(Tok::Path("#".into()));
            rest = &rest[1..];
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len())
                .max(c.len_utf8());
            out.push(Tok::Path(rest[..end].to_owned()));
            rest = &rest[end..];
        }
        rest = rest.trim_start();
    }
    out
}

struct Expr<'t, 'c> {
    toks: &'t [Tok],
    at: usize,
    ctx: &'c Ctx<'c>,
}

impl Expr<'_, '_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn op(&mut self, ops: &[&str]) -> Option<&'static str> {
        match self.peek() {
            Some(Tok::Op(o)) if ops.contains(o) => {
                let o = *o;
                self.at += 1;
                Some(o)
            }
            _ => None,
        }
    }

    fn comparison(&mut self) -> Val {
        let left = self.sum();
        let Some(op) = self.op(&["==", "!=", "<=", ">=", "<", ">"]) else {
            return left;
        };
        let right = self.sum();
        let (Some(a), Some(b)) = (left.as_f64(), right.as_f64()) else {
            return Val::Bool(false);
        };
        Val::Bool(match op {
            "==" => a == b,
            "!=" => a != b,
            "<=" => a <= b,
            ">=" => a >= b,
            "<" => a < b,
            _ => a > b,
        })
    }

    fn sum(&mut self) -> Val {
        let mut left = self.product();
        while let Some(op) = self.op(&["+", "-"]) {
            let right = self.product();
            left = arith(&left, op, &right);
        }
        left
    }

    fn product(&mut self) -> Val {
        let mut left = self.unary();
        while let Some(op) = self.op(&["*", "/"]) {
            let right = self.unary();
            left = arith(&left, op, &right);
        }
        left
    }

    fn unary(&mut self) -> Val {
        if self.op(&["-"]).is_some() {
            let v = self.unary();
            return arith(&Val::number(0.0), "-", &v);
        }
        self.atom()
    }

    fn atom(&mut self) -> Val {
        let Some(tok) = self.peek().cloned() else {
            return Val::unset();
        };
        self.at += 1;
        match tok {
            Tok::Num(v) => Val::number(v),
            Tok::Open => {
                let v = self.comparison();
                if self.peek() == Some(&Tok::Close) {
                    self.at += 1;
                }
                v
            }
            Tok::Path(p) if p == "abs" && self.peek() == Some(&Tok::Open) => match self.atom() {
                Val::Num { v, int, .. } => Val::Num {
                    v: v.abs(),
                    int,
                    set: v != 0.0,
                    unit: String::new(),
                    format: String::new(),
                },
                _ => Val::unset(),
            },
            Tok::Path(p) if p == "#" => match self.ctx.number {
                Some(n) => Val::Num {
                    v: n as f64,
                    int: true,
                    set: true,
                    unit: String::new(),
                    format: String::new(),
                },
                None => Val::unset(),
            },
            Tok::Path(p) => self.ctx.path(&p),
            Tok::Close | Tok::Op(_) => Val::unset(),
        }
    }
}

fn arith(a: &Val, op: &str, b: &Val) -> Val {
    let (Val::Num { v: x, int: ix, .. }, Val::Num { v: y, int: iy, .. }) = (a, b) else {
        return Val::unset();
    };
    let v = match op {
        "+" => x + y,
        "-" => x - y,
        "*" => x * y,
        _ if *y == 0.0 => return Val::unset(),
        _ => x / y,
    };
    Val::Num {
        v,
        int: *ix && *iy && op != "/",
        set: v != 0.0,
        unit: String::new(),
        format: String::new(),
    }
}

fn eval(ctx: &Ctx<'_>, expr: &str) -> Val {
    let toks = lex(expr);
    // A lone path keeps its unit and format; arithmetic drops them.
    Expr {
        toks: &toks,
        at: 0,
        ctx,
    }
    .comparison()
}

// ---------------------------------------------------------------------------------------------
// Templates.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Node {
    Text(String),
    Value {
        expr: String,
        spec: Option<String>,
    },
    If {
        cond: String,
        then: Vec<Node>,
        other: Vec<Node>,
    },
    Each {
        path: String,
        sep: String,
        body: Vec<Node>,
    },
}

/// An open section while parsing.
enum Open {
    If {
        cond: String,
        then: Vec<Node>,
        in_else: bool,
    },
    Each {
        path: String,
        sep: String,
    },
}

fn parse(template: &str) -> Vec<Node> {
    // (section, nodes collected in it so far); the bottom entry is the template itself.
    let mut stack: Vec<(Option<Open>, Vec<Node>)> = vec![(None, Vec::new())];
    let mut text = String::new();
    let mut rest = template;
    let flush = |text: &mut String, stack: &mut Vec<(Option<Open>, Vec<Node>)>| {
        if !text.is_empty()
            && let Some((_, nodes)) = stack.last_mut()
        {
            nodes.push(Node::Text(std::mem::take(text)));
        }
    };
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("{{") || rest.starts_with("}}") {
            text.push(c);
            rest = &rest[2..];
            continue;
        }
        if c != '{' {
            text.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        // A tag: up to the first `}` outside quotes.
        let mut quoted = false;
        let end = rest.char_indices().skip(1).find_map(|(i, ch)| match ch {
            '"' => {
                quoted = !quoted;
                None
            }
            '}' if !quoted => Some(i),
            _ => None,
        });
        let Some(end) = end else {
            text.push_str(rest);
            break;
        };
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        flush(&mut text, &mut stack);
        if let Some(cond) = tag.strip_prefix('?') {
            stack.push((
                Some(Open::If {
                    cond: cond.trim().to_owned(),
                    then: Vec::new(),
                    in_else: false,
                }),
                Vec::new(),
            ));
        } else if let Some(each) = tag.strip_prefix('@') {
            let (path, sep) = match each.split_once('"') {
                Some((p, s)) => (p.trim(), s.trim_end().trim_end_matches('"')),
                None => (each.trim(), ""),
            };
            stack.push((
                Some(Open::Each {
                    path: path.to_owned(),
                    sep: sep.to_owned(),
                }),
                Vec::new(),
            ));
        } else if tag == ":" {
            if let Some((Some(Open::If { then, in_else, .. }), nodes)) = stack.last_mut()
                && !*in_else
            {
                *then = std::mem::take(nodes);
                *in_else = true;
            }
        } else if tag == "/" {
            close(&mut stack);
        } else {
            let (expr, spec) = match tag.split_once(':') {
                Some((e, s)) => (e.trim(), Some(s.trim().to_owned())),
                None => (tag.trim(), None),
            };
            if let Some((_, nodes)) = stack.last_mut() {
                nodes.push(Node::Value {
                    expr: expr.to_owned(),
                    spec,
                });
            }
        }
    }
    flush(&mut text, &mut stack);
    while stack.len() > 1 {
        close(&mut stack);
    }
    stack.pop().map(|(_, nodes)| nodes).unwrap_or_default()
}

/// Closes the innermost section (a stray `{/}` at the top is ignored).
fn close(stack: &mut Vec<(Option<Open>, Vec<Node>)>) {
    if stack.len() < 2 {
        return;
    }
    let Some((Some(open), nodes)) = stack.pop() else {
        return;
    };
    let node = match open {
        Open::If {
            cond,
            then,
            in_else: true,
        } => Node::If {
            cond,
            then,
            other: nodes,
        },
        Open::If { cond, .. } => Node::If {
            cond,
            then: nodes,
            other: Vec::new(),
        },
        Open::Each { path, sep } => Node::Each {
            path,
            sep,
            body: nodes,
        },
    };
    if let Some((_, parent)) = stack.last_mut() {
        parent.push(node);
    }
}

fn render(ctx: &Ctx<'_>, nodes: &[Node], out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Value { expr, spec } => {
                out.push_str(&eval(ctx, expr).text(ctx.schema, spec.as_deref()));
            }
            Node::If { cond, then, other } => {
                let branch = if eval(ctx, cond).truthy() {
                    then
                } else {
                    other
                };
                render(ctx, branch, out);
            }
            Node::Each { path, sep, body } => {
                let Val::List { items, .. } = ctx.path(path) else {
                    continue;
                };
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    each_item(ctx.schema, item, i + 1, |ctx| render(ctx, body, out));
                }
            }
        }
    }
}

/// Runs `f` with the scope of one item of a list (its fields, `{.}`, `#`).
fn each_item(schema: &Schema, item: &Val, number: usize, f: impl FnOnce(&Ctx<'_>)) {
    let msg_scope;
    let scope: &dyn Scope = match item {
        Val::Msg(m) => {
            msg_scope = MessageScope(m);
            &msg_scope
        }
        _ => &NoScope,
    };
    f(&Ctx {
        schema,
        scope,
        this: Some(item.clone()),
        number: Some(number),
    });
}

/// Fills `template` with names from `scope`.
pub fn fill_scope(schema: &Schema, scope: &dyn Scope, template: &str) -> String {
    let ctx = Ctx {
        schema,
        scope,
        this: None,
        number: None,
    };
    let mut out = String::new();
    render(&ctx, &parse(template), &mut out);
    out
}

/// Fills `template` with the fields of `msg`.
pub fn fill(schema: &Schema, msg: &DynamicMessage, template: &str) -> String {
    let ctx = Ctx {
        schema,
        scope: &MessageScope(msg),
        this: Some(Val::Msg(msg.clone())),
        number: None,
    };
    let mut out = String::new();
    render(&ctx, &parse(template), &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Messages.
// ---------------------------------------------------------------------------------------------

/// The summary template a message declares: its `display` summary, else its command's.
fn summary_template(schema: &Schema, desc: &prost_reflect::MessageDescriptor) -> String {
    let display = schema.display(desc).summary;
    if !display.is_empty() {
        return display;
    }
    schema
        .command(desc.full_name())
        .map(|c| c.options.summary.clone())
        .unwrap_or_default()
}

/// True when the message declares a summary of its own (`display` or its command's).
pub fn has_summary(schema: &Schema, msg: &DynamicMessage) -> bool {
    !summary_template(schema, &msg.descriptor()).is_empty()
}

/// The one-line summary of any message: its declared summary filled in; a message whose
/// fields are one oneof reads as its set member; else its fields inline (`name=value …`).
pub fn summary(schema: &Schema, msg: &DynamicMessage) -> String {
    let desc = msg.descriptor();
    let template = summary_template(schema, &desc);
    if !template.is_empty() {
        return fill(schema, msg, &template);
    }
    let oneofs: Vec<_> = desc.oneofs().filter(|o| !o.is_synthetic()).collect();
    if let [oneof] = oneofs.as_slice()
        && oneof.fields().count() == desc.fields().count()
    {
        return oneof
            .fields()
            .find(|f| msg.has_field(f))
            .map(|f| field_val(schema, msg, &f).text(schema, None))
            .unwrap_or_default();
    }
    rows(schema, msg)
        .into_iter()
        .filter(|(p, _)| !p.contains('['))
        .map(|(p, v)| format!("{p}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The longer form of a message (`detail` lines, then its `table`), or `None` when it declares
/// neither and reads as its summary.
pub fn detail(schema: &Schema, msg: &DynamicMessage) -> Option<Vec<String>> {
    let display = schema.display(&msg.descriptor());
    let table_spec = display.table.filter(|t| !t.field.is_empty());
    if display.detail.is_empty() && table_spec.is_none() {
        return None;
    }
    let mut lines: Vec<String> = fill(schema, msg, &display.detail)
        .split('\n')
        .map(str::to_owned)
        .collect();
    if lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    if let Some(t) = table_spec {
        let ctx = Ctx {
            schema,
            scope: &MessageScope(msg),
            this: None,
            number: None,
        };
        let items = match ctx.path(&t.field) {
            Val::List { items, .. } => items,
            _ => Vec::new(),
        };
        if items.is_empty() {
            if !t.empty.is_empty() {
                lines.push(t.empty.clone());
            }
        } else {
            let columns: Vec<Vec<Node>> = t.columns.iter().map(|c| parse(&c.value)).collect();
            let rows: Vec<Vec<String>> = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    columns
                        .iter()
                        .map(|col| {
                            let mut cell = String::new();
                            each_item(schema, item, i + 1, |ctx| render(ctx, col, &mut cell));
                            cell
                        })
                        .collect()
                })
                .collect();
            let headers: Vec<&str> = t.columns.iter().map(|c| c.header.as_str()).collect();
            lines.extend(table(&headers, &rows).lines().map(str::to_owned));
        }
    }
    Some(lines)
}

// ---------------------------------------------------------------------------------------------
// Readings.
// ---------------------------------------------------------------------------------------------

/// A device's latest readings as a template scope: each reading by name, with the unit and
/// format its family declares, and `device.activity`.
pub struct Readings<'a> {
    pub family: &'a Family,
    /// The latest value of a reading, if the device reported it.
    pub value: &'a dyn Fn(&str) -> Option<f64>,
    /// `{device.activity}`.
    pub activity: &'a str,
}

impl Scope for Readings<'_> {
    fn get(&self, _: &Schema, name: &str) -> Option<Val> {
        if name == "device.activity" {
            return Some(Val::Text(self.activity.to_owned()));
        }
        if name.contains('.') {
            return None;
        }
        let declared = self.family.options.readings.iter().find(|r| r.name == name);
        let (unit, format) =
            declared.map_or_else(Default::default, |r| (r.unit.clone(), r.format.clone()));
        Some(match (self.value)(name) {
            Some(v) => Val::Num {
                v,
                int: false,
                set: true,
                unit,
                format,
            },
            None => Val::Unset { unit },
        })
    }
}

/// The family's key reading line (`FamilyOptions.key_reading`) for a device, or `None` if the
/// family declares none.
pub fn key_reading(schema: &Schema, readings: &Readings<'_>) -> Option<String> {
    let template = &readings.family.options.key_reading;
    if template.is_empty() {
        return None;
    }
    Some(fill_scope(schema, readings, template))
}

/// The reading a family's trend follows and its caption (`PV °C`), if it declares one.
pub fn trend(family: &Family) -> Option<(&str, String)> {
    let name = family.options.trend.as_str();
    if name.is_empty() {
        return None;
    }
    let r = family.options.readings.iter().find(|r| r.name == name);
    let caption = match r {
        Some(r) => {
            let label = if r.label.is_empty() { name } else { &r.label };
            if r.unit.is_empty() {
                label.to_owned()
            } else {
                format!("{label} {}", r.unit)
            }
        }
        None => name.to_owned(),
    };
    Some((name, caption))
}

// ---------------------------------------------------------------------------------------------
// Fields as rows (a message with no display declared).
// ---------------------------------------------------------------------------------------------

/// A value with its unit (`150 °C`), or as text.
pub fn value(v: &Value, unit: &str) -> String {
    let text = match v {
        Value::F64(x) => trim(*x),
        Value::F32(x) => trim(f64::from(*x)),
        Value::Bool(b) => b.to_string(),
        Value::I32(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::String(s) => s.clone(),
        Value::EnumNumber(n) => n.to_string(),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::List(items) => {
            let parts: Vec<String> = items.iter().map(|i| value(i, "")).collect();
            return if unit.is_empty() {
                format!("[{}]", parts.join(", "))
            } else {
                format!("[{}] {unit}", parts.join(", "))
            };
        }
        Value::Message(m) => inline(m),
        Value::Map(m) => format!("{} entries", m.len()),
    };
    if unit.is_empty() {
        text
    } else {
        format!("{text} {unit}")
    }
}

/// A number without a trailing `.0` where it is whole, else up to 6 significant decimals.
fn trim(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// `ramp{temperature_c=150, rate_c_per_min=5}`-style one-line form of a nested message.
fn inline(m: &DynamicMessage) -> String {
    let parts: Vec<String> = m
        .fields()
        .map(|(f, v)| format!("{}={}", f.name(), value(v, "")))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// The set fields of `msg` as `(path, text with unit)` rows, nested messages flattened with
/// dotted paths and lists indexed.
pub fn rows(schema: &Schema, msg: &DynamicMessage) -> Vec<(String, String)> {
    let mut out = Vec::new();
    collect(schema, msg, "", &mut out);
    out
}

fn collect(schema: &Schema, msg: &DynamicMessage, prefix: &str, out: &mut Vec<(String, String)>) {
    for (field, v) in msg.fields() {
        let path = if prefix.is_empty() {
            field.name().to_owned()
        } else {
            format!("{prefix}.{}", field.name())
        };
        let unit = schema.field_options(&field).unit.clone();
        match v {
            Value::Message(m) => collect(schema, m, &path, out),
            Value::List(items) if items.iter().all(|i| matches!(i, Value::Message(_))) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        collect(schema, m, &format!("{path}[{i}]"), out);
                    }
                }
            }
            v => out.push((path, value(v, &unit))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DeserializeOptions;

    const TEST_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/display_test.bin"));

    fn schema() -> Schema {
        Schema::new(&[TEST_SET]).expect("the test family loads")
    }

    fn msg(schema: &Schema, name: &str, json: &str) -> DynamicMessage {
        let desc = schema
            .pool()
            .get_message_by_name(&format!("ppu.schema.test.v1.{name}"))
            .expect("test message");
        let mut de = serde_json::Deserializer::from_str(json);
        DynamicMessage::deserialize_with_options(desc, &mut de, &DeserializeOptions::new())
            .expect("test JSON")
    }

    #[test]
    fn number_formats_follow_the_rules_ppuctl_printed_with() {
        assert_eq!(num(2.5), "2.5");
        assert_eq!(num(150.0), "150");
        assert_eq!(measured(149.96, 1), "150");
        assert_eq!(measured(-0.01, 1), "0");
        assert_eq!(measured(62.4, 0), "62");
        assert_eq!(measured_sci(0.00002, 4), "2.0e-5");
        assert_eq!(measured_sci(0.0, 4), "0");
        assert_eq!(measured_sci(0.05, 4), "0.05");
        assert_eq!(duration(45.0), "45 s");
        assert_eq!(duration(90.0), "1 min 30 s");
        assert_eq!(duration(7200.0), "2 h");
        assert_eq!(duration(7500.0), "2 h 05 min");
        assert_eq!(signed_pct(-0.0005), "−0.05 %");
        assert_eq!(signed_pct(0.0123), "+1.23 %");
        assert_eq!(signed_pct(-0.00001), "0.00 %");
        assert_eq!(
            table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]),
            "A    BB\nxyz  1\n"
        );
    }

    #[test]
    fn specs_parse_and_ignore_what_they_do_not_know() {
        assert_eq!(Spec::parse(".3").number, Number::Fixed(3));
        assert_eq!(Spec::parse("~4e").number, Number::AtMostSci(4));
        let s = Spec::parse("~2, nounit");
        assert_eq!((s.number, s.nounit), (Number::AtMost(2), true));
        assert_eq!(Spec::parse("sparkle").number, Number::Shortest);
    }

    #[test]
    fn a_summary_fills_units_lists_items_oneofs_and_conditions() {
        let s = schema();
        let run = msg(
            &s,
            "Run",
            r#"{"moves":[{"go":{"x_mm":12.5,"speed_mm_s":3.04}},{"pause":{"duration_s":90}},{}],
                "levels":[0.1,1]}"#,
        );
        assert_eq!(
            summary(&s, &run),
            "run 3 moves: go to 12.5 mm at 3 mm/s → pause 1 min 30 s → (nothing) at 0.1, 1 bar"
        );
        let run = msg(&s, "Run", r#"{"note":"dry","levels":[]}"#);
        assert_eq!(summary(&s, &run), "run 0 moves: , note dry at ");
        assert!(has_summary(&s, &run));
    }

    #[test]
    fn a_detail_numbers_items_and_a_table_computes_its_columns() {
        let s = schema();
        let run = msg(
            &s,
            "Run",
            r#"{"moves":[{"go":{"x_mm":1}},{"pause":{"duration_s":5}}]}"#,
        );
        assert_eq!(
            detail(&s, &run).unwrap(),
            ["1. go to 1 mm at 0 mm/s", "2. pause 5 s"]
        );
        let r = msg(
            &s,
            "RunResult",
            r#"{"points":[{"x":0.00002,"y":1},{"x":0,"y":2},{"x":2,"y":1}],"note":"n"}"#,
        );
        assert_eq!(
            detail(&s, &r).unwrap(),
            [
                "result of 3",
                "note: n",
                "#  X (bar)  Y/X",
                "1  2.0e-5   50000.000",
                "2  0        -",
                "3  2        0.500",
            ]
        );
        let empty = msg(&s, "RunResult", "{}");
        assert_eq!(detail(&s, &empty).unwrap(), ["result of 0", "(no points)"]);
        // A message that declares neither reads as its summary.
        assert!(detail(&s, &msg(&s, "Go", "{}")).is_none());
    }

    #[test]
    fn conditions_tell_set_from_unset_and_plurals_from_one() {
        let s = schema();
        let one = msg(&s, "RunResult", r#"{"points":[{"x":1,"y":0.5}],"ok":true}"#);
        assert_eq!(summary(&s, &one), "1 point, last y 0.50");
        // An optional field set to 0 is set; a plain bool false is not.
        let r = msg(&s, "RunResult", r#"{"deviation":0}"#);
        assert_eq!(summary(&s, &r), "0 points, 0.00 % (NOT ok)");
        let r = msg(&s, "RunResult", r#"{"deviation":-0.0005,"points":[{},{}]}"#);
        assert_eq!(summary(&s, &r), "2 points, last y 0.00, −0.05 % (NOT ok)");
    }

    #[test]
    fn a_message_without_a_template_reads_as_its_fields() {
        let s = schema();
        let m = msg(&s, "Plain", r#"{"a_ml":2.5,"b":"x"}"#);
        assert!(!has_summary(&s, &m));
        assert_eq!(summary(&s, &m), "a_ml=2.5 mL b=x");
    }

    #[test]
    fn expressions_guard_division_and_unset_operands() {
        let s = schema();
        let p = msg(&s, "Point", r#"{"x":4,"y":1}"#);
        assert_eq!(
            fill(&s, &p, "{y / x:.2} {x / 0} {abs(y - x)} {x * 2 + 1}"),
            "0.25 ? 3 9"
        );
        assert_eq!(
            fill(&s, &p, "{?x >= 4}a{/}{?x < 4}b{:}c{/}{?missing > 1}d{/}"),
            "ac"
        );
        assert_eq!(fill(&s, &p, "{{literal}} {x:nounit}"), "{literal} 4");
        // An unclosed section ends with the template.
        assert_eq!(fill(&s, &p, "{?x}open"), "open");
    }

    #[test]
    fn key_readings_and_trend_come_from_the_family() {
        let s = schema();
        let family = s.family("probe").unwrap();
        let values = |on: Option<f64>| {
            move |name: &str| match name {
                "t_c" => Some(150.04),
                "on" => on,
                _ => None,
            }
        };
        let line = |on| {
            let value = values(on);
            key_reading(
                &s,
                &Readings {
                    family,
                    value: &value,
                    activity: "busy",
                },
            )
            .unwrap()
        };
        assert_eq!(line(Some(1.0)), "T 150 °C, busy on");
        assert_eq!(line(Some(0.0)), "T 150 °C, busy off");
        assert_eq!(line(None), "T 150 °C, busy");
        let none = |_: &str| None;
        let r = Readings {
            family,
            value: &none,
            activity: "offline",
        };
        assert_eq!(key_reading(&s, &r).unwrap(), "T ? °C, offline");
        assert_eq!(trend(family), Some(("t_c", "T °C".to_owned())));
    }
}
