//! Stop strings in streamed text: what is safe to show, and where the text ends.

/// Finds stop strings in streamed text, holding back what could still become one.
#[derive(Debug)]
pub struct StopMatcher {
    /// The stop strings, empty ones left out (they would match everywhere).
    stops: Vec<String>,
    /// The text ends after the stop string rather than before it.
    include_stop: bool,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher of `stops` (empty strings never match). With `include_stop`, the text ends with
    /// the stop string that ended it (vLLM's `include_stop_str_in_output`); otherwise before it.
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        StopMatcher { stops, include_stop, text: String::new(), emitted: 0, stopped: false }
    }

    /// Appends `piece`; returns the text now safe to show and whether a stop string was found.
    /// When several are found, the one that starts first ends the text (the longest of those
    /// that start there, when the stop string is kept).
    pub fn push(&mut self, piece: &str) -> (&str, bool) {
        if self.stopped {
            return ("", true);
        }
        self.text.push_str(piece);
        let from = self.emitted;
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, len)| (at, std::cmp::Reverse(len)));
        let end = match found {
            Some((at, len)) => {
                self.stopped = true;
                self.text.truncate(from + at + if self.include_stop { len } else { 0 });
                self.text.len()
            }
            None => self.text.len() - self.held_back(),
        };
        self.emitted = end;
        (&self.text[from..end], self.stopped)
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let tail = &self.text[self.emitted..];
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(tail.len() + 1)).rev().find(|&n| s.is_char_boundary(n) && tail.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0)
    }

    /// Hands out whatever was held back.
    pub fn flush(&mut self) -> &str {
        let from = self.emitted;
        self.emitted = self.text.len();
        &self.text[from..]
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_with(stops: &[&str], include_stop: bool, pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(stops, include_stop);
        let mut shown = String::new();
        for p in pieces {
            let (ready, stopped) = m.push(p);
            shown.push_str(ready);
            if stopped {
                break;
            }
        }
        if !m.stopped() {
            shown.push_str(m.flush());
        }
        (shown, m.stopped())
    }

    fn stream(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        stream_with(stops, false, pieces)
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut_and_never_shown() {
        assert_eq!(stream(&["END"], &["Hello E", "N", "D and more"]), ("Hello ".into(), true));
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_complete() {
        assert_eq!(stream(&["END"], &["a E", "x", "EN"]), ("a ExEN".into(), false));
    }

    #[test]
    fn earliest_stop_string_wins() {
        assert_eq!(stream(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn an_included_stop_string_ends_the_text_and_nothing_after_it_shows() {
        assert_eq!(stream_with(&["END"], true, &["Hello E", "N", "D and more"]), ("Hello END".into(), true));
        // Of two stop strings that start at the same place, the longer one is kept whole.
        assert_eq!(stream_with(&["ab", "abc"], true, &["xabcd"]), ("xabc".into(), true));
        assert_eq!(stream_with(&["ab", "abc"], false, &["xabcd"]), ("x".into(), true));
    }

    #[test]
    fn empty_stop_strings_never_match() {
        assert_eq!(stream(&[""], &["abc"]), ("abc".into(), false));
    }
}
