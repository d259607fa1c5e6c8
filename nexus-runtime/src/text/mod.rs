//! Text in and out of token ids: the [`tokenizer`] (from a GGUF's vocabulary or
//! `tokenizer.json`), [`chat_template`]s, and [`stop`] strings in streamed text.

pub mod chat_template;
pub mod stop;
pub mod tokenizer;
