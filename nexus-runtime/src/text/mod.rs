//! Text in and out of token ids: the [`tokenizer`] (from a GGUF's vocabulary or
//! `tokenizer.json`), [`chat_template`]s, [`stop`] strings in streamed text, and the
//! [`detokenizer`] that turns a request's output tokens into text to show.

pub mod chat_template;
pub mod detokenizer;
pub mod stop;
pub mod tokenizer;
