//! The device-family schema: what every layer of ppu knows about a family without naming it.
//!
//! A family declares its commands, results and intermediate responses in a `.proto` file it
//! owns, annotated with the options of `ppu.schema.v1` (units, bounds tied to the device's
//! limits, accepted values, compatibility aliases; see `proto/ppu/schema/v1/options.proto`).
//! [`Schema`] loads those descriptors into one pool and indexes the annotations; the daemon
//! validates commands with it ([`validate`]), converts to and from the typed v1 aliases with it
//! ([`wire`]), and ppuctl and the SDKs render with it ([`render`]). Nothing here names a family.

pub mod limits;
pub mod render;
pub mod validate;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

pub use limits::Limits;
pub use prost_reflect;

/// The `ppu.schema.v1` option messages, generated.
pub mod options {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ppu.schema.v1.rs"));

    /// Encoded `FileDescriptorSet` of `ppu/schema/v1/options.proto` and its imports.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ppu_schema_v1.bin"));
}

/// `type.googleapis.com/`, the prefix of every `google.protobuf.Any` type URL ppu writes.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// The type URL of a message, as packed into a `google.protobuf.Any`.
pub fn type_url(full_name: &str) -> String {
    format!("{TYPE_URL_PREFIX}{full_name}")
}

/// The message name a type URL names (everything after the last `/`).
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Why a set of descriptors does not make a schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("descriptor set does not load: {0}")]
    Descriptor(String),
    #[error("{file}: {reason}")]
    Family { file: String, reason: String },
}

/// A device family, from its file's `(ppu.schema.v1.family)` option.
#[derive(Debug, Clone)]
pub struct Family {
    pub options: options::FamilyOptions,
    /// The `.proto` file that declares it.
    pub file: String,
    /// Its commands' full names.
    pub commands: Vec<String>,
}

impl Family {
    pub fn name(&self) -> &str {
        &self.options.name
    }
}

/// A command a step can run, from its message's `(ppu.schema.v1.command)` option.
#[derive(Debug, Clone)]
pub struct Command {
    pub options: options::CommandOptions,
    /// The family it belongs to.
    pub family: String,
    pub message: MessageDescriptor,
    pub result: Option<MessageDescriptor>,
    pub intermediate: Option<MessageDescriptor>,
}

impl Command {
    /// The step key (`furnace`, `gas_flow`).
    pub fn name(&self) -> &str {
        &self.options.name
    }

    pub fn capability(&self) -> &str {
        &self.options.capability
    }

    pub fn full_name(&self) -> &str {
        self.message.full_name()
    }

    /// Text saying why the command must not run twice, if so.
    pub fn not_rerunnable(&self) -> Option<&str> {
        Some(self.options.not_rerunnable.as_str()).filter(|s| !s.is_empty())
    }
}

/// Every family's descriptors in one pool, with their annotations indexed.
///
/// Cheap to clone (shared). Built once at start-up from the descriptor sets each family
/// registers; lookups never fail for a registered name.
#[derive(Debug, Clone)]
pub struct Schema {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: DescriptorPool,
    families: Vec<Family>,
    commands: Vec<Command>,
    by_full_name: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    by_v1_step: HashMap<u32, usize>,
    by_result: HashMap<String, usize>,
    /// Every field's `(ppu.schema.v1.field)`, by the field's full name, read once: the
    /// validators ask for it on every field of every step submitted.
    field_options: HashMap<String, options::FieldOptions, Fnv>,
    /// Every message's `(ppu.schema.v1.display)`, by the message's full name.
    display: HashMap<String, options::DisplayOptions>,
    no_field_options: options::FieldOptions,
    no_display: options::DisplayOptions,
    /// Every `max_items_limit` name the fields use, once each.
    items_limits: Vec<String>,
}

impl Schema {
    /// Loads descriptor sets (each an encoded `FileDescriptorSet`; the options' own set is
    /// added first) and indexes every family file in them.
    pub fn new(sets: &[&[u8]]) -> Result<Self, SchemaError> {
        let mut pool = DescriptorPool::new();
        for set in std::iter::once(options::FILE_DESCRIPTOR_SET).chain(sets.iter().copied()) {
            pool.decode_file_descriptor_set(set)
                .map_err(|e| SchemaError::Descriptor(e.to_string()))?;
        }
        Self::from_pool(pool)
    }

    /// Indexes a pool that already holds `ppu/schema/v1/options.proto` and the families.
    pub fn from_pool(pool: DescriptorPool) -> Result<Self, SchemaError> {
        let ext = |name: &str| pool.get_extension_by_name(name);
        let family_ext = ext("ppu.schema.v1.family");
        let command_ext = ext("ppu.schema.v1.command");
        let field_ext = ext("ppu.schema.v1.field");
        let display_ext = ext("ppu.schema.v1.display");
        let mut families = Vec::new();
        let mut commands = Vec::new();
        let (Some(family_ext), Some(command_ext)) = (family_ext, command_ext) else {
            return Err(SchemaError::Descriptor(
                "ppu/schema/v1/options.proto is not in the pool".into(),
            ));
        };
        for file in pool.files() {
            let opts = file.options();
            if !opts.has_extension(&family_ext) {
                continue;
            }
            let bad = |reason: String| SchemaError::Family {
                file: file.name().to_owned(),
                reason,
            };
            let family: options::FamilyOptions = transcode(&opts.get_extension(&family_ext))
                .map_err(|e| bad(format!("family option: {e}")))?;
            if family.name.is_empty() {
                return Err(bad("the family option has no name".into()));
            }
            let mut names = Vec::new();
            for message in file.messages() {
                let mopts = message.options();
                if !mopts.has_extension(&command_ext) {
                    continue;
                }
                let options: options::CommandOptions =
                    transcode(&mopts.get_extension(&command_ext))
                        .map_err(|e| bad(format!("{}: command option: {e}", message.name())))?;
                let lookup = |what: &str, name: &str| -> Result<Option<MessageDescriptor>, _> {
                    if name.is_empty() {
                        return Ok(None);
                    }
                    pool.get_message_by_name(name).map(Some).ok_or_else(|| {
                        bad(format!("{}: {what} {name} is not defined", message.name()))
                    })
                };
                let result = lookup("result", &options.result)?;
                let intermediate = lookup("intermediate", &options.intermediate)?;
                if options.name.is_empty() || options.capability.is_empty() {
                    return Err(bad(format!(
                        "{}: a command needs a name and a capability",
                        message.name()
                    )));
                }
                names.push(message.full_name().to_owned());
                commands.push(Command {
                    options,
                    family: family.name.clone(),
                    message,
                    result,
                    intermediate,
                });
            }
            families.push(Family {
                options: family,
                file: file.name().to_owned(),
                commands: names,
            });
        }
        let mut by_full_name = HashMap::new();
        let mut by_name = HashMap::new();
        let mut by_v1_step = HashMap::new();
        let mut by_result = HashMap::new();
        for (i, c) in commands.iter().enumerate() {
            by_full_name.insert(c.full_name().to_owned(), i);
            if by_name.insert(c.name().to_owned(), i).is_some() {
                return Err(SchemaError::Family {
                    file: c.message.parent_file().name().to_owned(),
                    reason: format!("two commands are named {:?}", c.name()),
                });
            }
            if c.options.v1_step_field != 0 {
                by_v1_step.insert(c.options.v1_step_field, i);
            }
            if let Some(r) = &c.result {
                by_result.insert(r.full_name().to_owned(), i);
            }
        }
        let mut field_options = HashMap::with_hasher(Fnv);
        let mut display = HashMap::new();
        for message in pool.all_messages() {
            if let Some(ext) = &display_ext {
                let opts = message.options();
                if opts.has_extension(ext)
                    && let Ok(d) = transcode(&opts.get_extension(ext))
                {
                    display.insert(message.full_name().to_owned(), d);
                }
            }
            let Some(ext) = &field_ext else {
                continue;
            };
            for field in message.fields() {
                let opts = field.options();
                if opts.has_extension(ext)
                    && let Ok(f) = transcode(&opts.get_extension(ext))
                {
                    field_options.insert(field.full_name().to_owned(), f);
                }
            }
        }
        let mut items_limits: Vec<String> = field_options
            .values()
            .map(|o: &options::FieldOptions| o.max_items_limit.clone())
            .filter(|n| !n.is_empty())
            .collect();
        items_limits.sort();
        items_limits.dedup();
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                families,
                commands,
                by_full_name,
                by_name,
                by_v1_step,
                by_result,
                field_options,
                display,
                no_field_options: Default::default(),
                no_display: Default::default(),
                items_limits,
            }),
        })
    }

    pub fn pool(&self) -> &DescriptorPool {
        &self.inner.pool
    }

    /// The whole pool as an encoded `FileDescriptorSet` (for reflection and clients).
    pub fn file_descriptor_set(&self) -> Vec<u8> {
        self.inner.pool.encode_to_vec()
    }

    pub fn families(&self) -> &[Family] {
        &self.inner.families
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.inner.families.iter().find(|f| f.name() == name)
    }

    pub fn commands(&self) -> &[Command] {
        &self.inner.commands
    }

    /// The command a message (by full name or type URL) is.
    pub fn command(&self, type_url_or_name: &str) -> Option<&Command> {
        let i = self.inner.by_full_name.get(type_name(type_url_or_name))?;
        self.inner.commands.get(*i)
    }

    /// The command whose step key is `name` (`furnace`, `gas_flow`).
    pub fn command_named(&self, name: &str) -> Option<&Command> {
        let i = self.inner.by_name.get(name)?;
        self.inner.commands.get(*i)
    }

    /// The command aliased by field `number` of `ppu.v1.Step.kind`.
    pub fn command_by_v1_step(&self, number: u32) -> Option<&Command> {
        let i = self.inner.by_v1_step.get(&number)?;
        self.inner.commands.get(*i)
    }

    /// The command whose result is the message `full_name`.
    pub fn command_by_result(&self, full_name: &str) -> Option<&Command> {
        let i = self.inner.by_result.get(type_name(full_name))?;
        self.inner.commands.get(*i)
    }

    /// The commands a capability runs.
    pub fn commands_of(&self, capability: &str) -> impl Iterator<Item = &Command> {
        self.inner
            .commands
            .iter()
            .filter(move |c| c.capability() == capability)
    }

    /// Every capability, once each, in declaration order.
    pub fn capabilities(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for c in &self.inner.commands {
            if !out.contains(&c.capability()) {
                out.push(c.capability());
            }
        }
        out
    }

    /// A field's `(ppu.schema.v1.field)` annotation; the default (no constraint) if it has none.
    pub fn field_options(&self, field: &prost_reflect::FieldDescriptor) -> &options::FieldOptions {
        self.inner
            .field_options
            .get(field.full_name())
            .unwrap_or(&self.inner.no_field_options)
    }

    /// The `[limits]` keys the fields' `max_items_limit`s name, once each.
    pub fn items_limits(&self) -> &[String] {
        &self.inner.items_limits
    }

    /// A message's `(ppu.schema.v1.display)` annotation; the default (nothing declared) if none.
    pub fn display(&self, message: &MessageDescriptor) -> options::DisplayOptions {
        self.inner
            .display
            .get(message.full_name())
            .unwrap_or(&self.inner.no_display)
            .clone()
    }

    /// The family a device belongs to: by its family name, else by its `ppu.v1.DeviceFamily`.
    pub fn device_family(&self, name: &str, v1_family: u32) -> Option<&Family> {
        if !name.is_empty() {
            return self.family(name);
        }
        if v1_family == 0 {
            return None;
        }
        self.inner
            .families
            .iter()
            .find(|f| f.options.v1_family == v1_family)
    }

    /// Decodes `bytes` as the message `full_name` (or type URL).
    pub fn decode(&self, type_url_or_name: &str, bytes: &[u8]) -> Result<DynamicMessage, String> {
        let name = type_name(type_url_or_name);
        let desc = self
            .inner
            .pool
            .get_message_by_name(name)
            .ok_or_else(|| format!("unknown message type {name:?}"))?;
        DynamicMessage::decode(desc, bytes).map_err(|e| format!("{name} does not decode: {e}"))
    }
}

/// FNV-1a: the options lookup hashes a field's full name for every field of every submitted
/// step; names are ours (compiled in), so a keyed hash buys nothing and costs several times
/// more.
#[derive(Clone, Copy, Default)]
struct Fnv;

impl std::hash::BuildHasher for Fnv {
    type Hasher = FnvHasher;
    fn build_hasher(&self) -> FnvHasher {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::fmt::Debug for Fnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fnv")
    }
}

struct FnvHasher(u64);

impl std::hash::Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn transcode<T: prost::Message + Default>(v: &prost_reflect::Value) -> Result<T, String> {
    match v {
        prost_reflect::Value::Message(m) => m.transcode_to::<T>().map_err(|e| e.to_string()),
        other => Err(format!("expected a message, found {other:?}")),
    }
}
