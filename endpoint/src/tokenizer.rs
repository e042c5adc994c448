//! Text <-> token ids: Hugging Face `tokenizer.json` (the `tokenizers` crate, pure Rust) with the
//! chat template of `tokenizer_config.json` (minijinja), or a byte-level tokenizer for the
//! built-in model (token id = byte value).

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizing: {0}")]
    Encode(String),
    #[error("detokenizing: {0}")]
    Decode(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// A chat template (Jinja) with the special tokens it may reference.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Used when a tokenizer ships no template (and for the byte-level tokenizer).
const DEFAULT_TEMPLATE: &str = "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant: {% endif %}";

fn raise_exception(message: String) -> Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self, TokenizerError> {
        let mut env = minijinja::Environment::new();
        // HF templates are Python Jinja: `.strip()`, `.split()`, `.startswith()`, ...
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (each a JSON object with `role` and string `content`).
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, TokenizerError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        if let Some(extra) = extra {
            ctx.extend(extra.clone());
        }
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        ctx.insert("bos_token".into(), Value::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::String(self.eos_token.clone()));
        if let Some(t) = tools.filter(|t| !t.is_null()) {
            ctx.insert("tools".into(), t.clone());
        }
        tmpl.render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| TokenizerError::Template(format!("{e:#}")))
    }
}

pub enum TextTokenizer {
    /// Token id = byte value (vocabulary of 256); for the built-in model.
    Bytes { template: ChatTemplate },
    Hf {
        tokenizer: Box<tokenizers::Tokenizer>,
        template: ChatTemplate,
        eos_token_ids: Vec<u32>,
    },
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn bytes() -> Self {
        let template = ChatTemplate::new(DEFAULT_TEMPLATE, String::new(), String::new())
            .unwrap_or_else(|_| unreachable!("the default template is valid"));
        TextTokenizer::Bytes { template }
    }

    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|source| TokenizerError::Io {
                path: cfg_path.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Load {
                path: cfg_path.clone(),
                message: e.to_string(),
            })?
        } else {
            Value::Null
        };
        let bos = token_text(cfg.get("bos_token")).unwrap_or_default();
        let eos = token_text(cfg.get("eos_token")).unwrap_or_default();
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .unwrap_or(DEFAULT_TEMPLATE)
                .to_string(),
            _ => DEFAULT_TEMPLATE.to_string(),
        };
        let template = ChatTemplate::new(&source, bos, eos.clone()).map_err(|e| TokenizerError::Load {
            path: cfg_path,
            message: e.to_string(),
        })?;
        let eos_token_ids = tokenizer.token_to_id(&eos).into_iter().collect();
        Ok(TextTokenizer::Hf {
            tokenizer: Box::new(tokenizer),
            template,
            eos_token_ids,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        match self {
            TextTokenizer::Bytes { .. } => Ok(text.bytes().map(u32::from).collect()),
            TextTokenizer::Hf { tokenizer, .. } => tokenizer
                .encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// Decodes ids, dropping special tokens (vLLM's `skip_special_tokens=True`).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            TextTokenizer::Bytes { .. } => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            TextTokenizer::Hf { tokenizer, .. } => tokenizer
                .decode(ids, true)
                .map_err(|e| TokenizerError::Decode(e.to_string())),
        }
    }

    /// One token's text (special tokens included) and bytes, as log-probabilities report it.
    /// A byte-level token that is only part of a character reads as U+FFFD; its bytes are exact.
    pub fn token_piece(&self, id: u32) -> (String, Vec<u8>) {
        match self {
            TextTokenizer::Bytes { .. } => {
                let bytes: Vec<u8> = u8::try_from(id).map(|b| vec![b]).unwrap_or_default();
                (String::from_utf8_lossy(&bytes).into_owned(), bytes)
            }
            TextTokenizer::Hf { tokenizer, .. } => {
                let text = tokenizer
                    .decode(&[id], false)
                    .ok()
                    .or_else(|| tokenizer.id_to_token(id))
                    .unwrap_or_default();
                let bytes = text.as_bytes().to_vec();
                (text, bytes)
            }
        }
    }

    pub fn template(&self) -> &ChatTemplate {
        match self {
            TextTokenizer::Bytes { template } | TextTokenizer::Hf { template, .. } => template,
        }
    }

    /// Token ids of the tokenizer's EOS token (in addition to the model config's).
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            TextTokenizer::Bytes { .. } => &[],
            TextTokenizer::Hf { eos_token_ids, .. } => eos_token_ids,
        }
    }
}

/// Streams text out of a growing list of token ids without splitting multi-byte characters or
/// merged pieces (the prefix/read-offset scheme of vLLM and TGI).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(delta) = full.get(prefix.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(delta);
            }
        }
        Ok(String::new())
    }

    /// Text still held back at the end (an incomplete character), flushed as is.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String, TokenizerError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Finds stop strings in streamed text, holding back what could still become one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    longest: usize,
    text: String,
    emitted: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            longest,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds text; returns what may be sent now and whether a stop string was hit (the text
    /// is then cut before it).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        let search_from = floor_boundary(&self.text, self.text.len().saturating_sub(self.longest));
        self.text.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|p| search_from + p))
            .min();
        if let Some(pos) = hit {
            self.text.truncate(pos);
            return (self.take_to(pos.max(self.emitted)), true);
        }
        let safe = floor_boundary(
            &self.text,
            self.text.len().saturating_sub(self.longest.saturating_sub(1)),
        );
        (self.take_to(safe.max(self.emitted)), false)
    }

    /// Everything not yet sent.
    pub fn flush(&mut self) -> String {
        self.take_to(self.text.len())
    }

    fn take_to(&mut self, end: usize) -> String {
        let out = self.text.get(self.emitted..end).unwrap_or_default().to_string();
        self.emitted = end;
        out
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_cuts_at_stop_across_deltas() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let (a, hit) = m.push("hello E");
        assert!(!hit);
        let (b, hit) = m.push("NDworld");
        assert!(hit);
        assert_eq!(format!("{a}{b}"), "hello ");
    }

    #[test]
    fn stop_matcher_without_stops_passes_text_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), ("abc".to_string(), false));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn byte_decoder_holds_incomplete_utf8() {
        let tok = TextTokenizer::bytes();
        let mut d = IncrementalDecoder::default();
        let bytes = "é!".as_bytes();
        assert_eq!(d.push(&tok, bytes[0] as u32).unwrap(), "");
        assert_eq!(d.push(&tok, bytes[1] as u32).unwrap(), "é");
        assert_eq!(d.push(&tok, bytes[2] as u32).unwrap(), "!");
    }
}
