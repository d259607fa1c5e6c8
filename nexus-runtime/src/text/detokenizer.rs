//! A request's output tokens as text to show: the one path from token ids to text, with stop
//! strings, that `nexus generate` ([`crate::engine::generate::generate_text`]) and `nexus serve`
//! both take, so that the same tokens give the same text and stop at the same place in both.

use crate::Result;
use crate::text::stop::StopMatcher;
use crate::text::tokenizer::{StreamDecoder, Tokenizer};

/// Turns a request's output tokens, one at a time, into pieces of text that are safe to show:
/// never part of a UTF-8 character, never what could still become a stop string. Stop strings
/// end the text only from the `min_tokens`-th token on (as end-of-sequence tokens do in the
/// engine); special tokens are not shown.
#[derive(Debug)]
pub struct Detokenizer {
    /// `None` for a model without a tokenizer: its tokens have no text.
    decoder: Option<StreamDecoder>,
    stops: StopMatcher,
    min_tokens: usize,
    /// Tokens pushed so far.
    tokens: usize,
}

/// What a token (or the end of the output) adds to the text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextDelta {
    /// Text now safe to show (often empty: a token may hold part of a character, or of what may
    /// be a stop string).
    pub text: String,
    /// A stop string ended the text: nothing more comes.
    pub stopped: bool,
}

impl Detokenizer {
    /// A detokenizer of `tokenizer`'s tokens (none: every token's text is empty) that ends the
    /// text at the first of `stops` found from the `min_tokens`-th token on, before it, or after
    /// it with `include_stop` (vLLM's `include_stop_str_in_output`).
    pub fn new(tokenizer: Option<&Tokenizer>, stops: Vec<String>, min_tokens: usize, include_stop: bool) -> Self {
        Detokenizer {
            decoder: tokenizer.map(|t| t.stream_decoder(true)),
            stops: StopMatcher::new(stops, include_stop),
            min_tokens,
            tokens: 0,
        }
    }

    /// Adds the next output token. A token the tokenizer does not know is an error (and adds
    /// nothing); after a stop string, tokens add nothing.
    pub fn push(&mut self, token: u32) -> Result<TextDelta> {
        if self.stops.stopped() {
            return Ok(TextDelta { text: String::new(), stopped: true });
        }
        let piece = match &mut self.decoder {
            Some(decoder) => decoder.push(token)?.unwrap_or_default(),
            None => String::new(),
        };
        self.tokens += 1;
        Ok(self.release(&piece))
    }

    /// Ends the output: the text still held back (an unfinished character, a prefix of a stop
    /// string that will not complete now), cut at a stop string if the rest completes one.
    pub fn finish(&mut self) -> Result<TextDelta> {
        let rest = match self.decoder.take() {
            Some(decoder) if !self.stops.stopped() => decoder.finish()?.unwrap_or_default(),
            _ => String::new(),
        };
        let mut delta = self.release(&rest);
        if !delta.stopped {
            delta.text.push_str(self.stops.flush());
        }
        Ok(delta)
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stops.stopped()
    }

    /// Passes `piece` through the stop strings, or straight out before `min_tokens` (the matcher
    /// never sees that text, so no stop string can end in it).
    fn release(&mut self, piece: &str) -> TextDelta {
        if self.tokens < self.min_tokens {
            return TextDelta { text: piece.to_owned(), stopped: false };
        }
        let (ready, stopped) = self.stops.push(piece);
        TextDelta { text: ready.to_owned(), stopped }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::weights::gguf::GgufFile;

    fn smollm2() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
        Tokenizer::from_gguf(&GgufFile::open(&path).expect("opens")).expect("tokenizer")
    }

    /// The text `d` shows for `ids`, up to a stop, and whether one was found.
    fn show(d: &mut Detokenizer, ids: &[u32]) -> (String, bool) {
        let mut shown = String::new();
        for &id in ids {
            let delta = d.push(id).expect("push");
            shown.push_str(&delta.text);
            if delta.stopped {
                return (shown, true);
            }
        }
        let delta = d.finish().expect("finish");
        shown.push_str(&delta.text);
        (shown, delta.stopped)
    }

    #[test]
    fn text_stops_at_a_stop_string_across_tokens_and_keeps_it_when_asked() {
        let tokenizer = smollm2();
        let ids = tokenizer.encode(" Paris is the capital. Berlin too.", false).expect("encode");
        let stops = || vec!["capital.".to_owned()];
        let mut plain = Detokenizer::new(Some(&tokenizer), stops(), 0, false);
        assert_eq!(show(&mut plain, &ids), (" Paris is the ".into(), true));
        let mut kept = Detokenizer::new(Some(&tokenizer), stops(), 0, true);
        assert_eq!(show(&mut kept, &ids), (" Paris is the capital.".into(), true));
        // Tokens after the stop add nothing.
        assert_eq!(kept.push(ids[0]).expect("push"), TextDelta { text: String::new(), stopped: true });
    }

    #[test]
    fn stop_strings_wait_for_min_tokens() {
        let tokenizer = smollm2();
        let ids = tokenizer.encode("a. b. c.", false).expect("encode");
        let dot = ids.iter().position(|&id| tokenizer.decode(&[id], false).expect("decode").contains('.'));
        let dot = dot.expect("a token with a dot");
        // The first dot is within min_tokens: the text goes on to the next one.
        let mut d = Detokenizer::new(Some(&tokenizer), vec![".".into()], dot + 2, false);
        assert_eq!(show(&mut d, &ids), ("a. b".into(), true));
    }

    #[test]
    fn a_character_split_over_tokens_is_shown_whole_and_the_rest_at_the_end() {
        let tokenizer = smollm2();
        let ids = tokenizer.encode("café 🦀", false).expect("encode");
        let mut d = Detokenizer::new(Some(&tokenizer), vec!["zzz".into()], 0, false);
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(d.push(id).expect("push").text);
        }
        pieces.push(d.finish().expect("finish").text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), "café 🦀");
        // Without a tokenizer, tokens have no text.
        let mut none = Detokenizer::new(None, Vec::new(), 0, false);
        assert_eq!(show(&mut none, &[1, 2, 3]), (String::new(), false));
    }
}
