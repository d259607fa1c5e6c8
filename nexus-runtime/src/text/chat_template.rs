//! Chat templates: the Jinja template a model ships with, rendered with `minijinja`.
//!
//! Hugging Face renders these templates with Python's Jinja2 (`trim_blocks` and `lstrip_blocks`
//! on, a `raise_exception` function, and Python string methods such as `.strip()` available on
//! values). [`ChatTemplate`] sets up a `minijinja` environment the same way, so that a model's own
//! template text produces the prompt it was trained on.

use minijinja::Environment;
use serde::Serialize;

use crate::{Error, ErrorKind, Result};

/// The name the template is registered under in its environment.
const TEMPLATE_NAME: &str = "chat";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user` or `assistant` (templates may accept others, e.g. `tool`).
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts of those special tokens,
    /// which templates refer to as the variables `bos_token` and `eos_token`; when `None`, the
    /// variables are undefined (and render as empty strings).
    ///
    /// A syntax error is an error of kind [`ErrorKind::Template`].
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // Transformers renders with these two Jinja2 options on; templates are written for them,
        // so without them the prompt would gain stray newlines and indentation.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| template_error("the chat template does not compile", &e))?;
        Ok(ChatTemplate { env, bos_token: bos_token.map(str::to_owned), eos_token: eos_token.map(str::to_owned) })
    }

    /// Renders `messages` into a prompt. With `add_generation_prompt`, the prompt ends with the
    /// header of an assistant turn, so that the model's continuation is the reply.
    ///
    /// A template that raises an exception (many reject unsupported role orders this way) or
    /// fails to evaluate gives an error of kind [`ErrorKind::Template`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template =
            self.env.get_template(TEMPLATE_NAME).map_err(|e| template_error("the chat template is missing", &e))?;
        template
            .render(RenderContext {
                messages,
                add_generation_prompt,
                bos_token: self.bos_token.as_deref(),
                eos_token: self.eos_token.as_deref(),
            })
            .map_err(|e| template_error("rendering the chat template failed", &e))
    }
}

/// A template error whose message carries minijinja's: template errors are usually the answer to
/// a request (a role order the template rejects, with the template's own words), so the reason
/// belongs in the message that reaches the client rather than in a source chain.
fn template_error(what: &str, e: &minijinja::Error) -> Error {
    Error::new(ErrorKind::Template, format!("{what}: {e}"))
}

/// The variables a template sees. A special token the model lacks is left undefined rather than
/// set to none, as transformers does, so that it renders as nothing instead of `none`.
#[derive(Serialize)]
struct RenderContext<'a> {
    messages: &'a [ChatMessage],
    add_generation_prompt: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token: Option<&'a str>,
}

/// The `raise_exception(message)` function that Hugging Face provides to templates.
fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        let source = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        ChatTemplate::new(source, None, None).expect("template compiles")
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
        let out = chatml().render(&messages, true).expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = chatml().render(&messages[1..], false).expect("renders");
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn blocks_are_trimmed_like_jinja2_in_transformers() {
        // With trim_blocks and lstrip_blocks, the newline after a block tag and the indentation
        // before it disappear.
        let source =
            "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(source, None, None).expect("compiles");
        assert_eq!(t.render(&[ChatMessage::new("user", "a")], false).expect("renders"), "[a]\n");
    }

    #[test]
    fn python_string_methods_and_special_tokens() {
        let source = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(source, Some("<s>"), Some("</s>")).expect("compiles");
        assert_eq!(t.render(&[ChatMessage::new("user", "  hi ")], false).expect("renders"), "<s>HI</s>");
        let t = ChatTemplate::new(source, None, None).expect("compiles");
        assert_eq!(t.render(&[ChatMessage::new("user", "x")], false).expect("renders"), "X");
    }

    #[test]
    fn raise_exception_is_a_template_error_with_its_message() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}ok";
        let t = ChatTemplate::new(source, None, None).expect("compiles");
        let err = t.render(&[ChatMessage::new("assistant", "x")], false).expect_err("raises");
        assert_eq!(err.kind(), ErrorKind::Template);
        assert!(err.to_string().contains("Conversations must start with a user message"), "{err}");
        assert_eq!(t.render(&[ChatMessage::new("user", "x")], false).expect("renders"), "ok");
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None).expect_err("unclosed for");
        assert_eq!(err.kind(), ErrorKind::Template);
    }
}
