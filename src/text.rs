//! The character policy for free text that clients send and Hall records or shows: token
//! names, `correlation_id`, `tenant_risk`, `qos_class`. Such text ends up in the audit log,
//! its exports and `hall token list`, where a control character can forge a line and a
//! bidirectional override (U+202E) can make `evil` display as `live`. So: a length limit in
//! characters, no control characters (C0, DEL, C1), no bidi controls, no invisible format
//! characters (zero-width spaces and joiners, BOM).

/// Why a text was refused, as a phrase for an error message ("must …").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextError {
    Empty,
    TooLong { max: usize },
    Forbidden { ch: char },
}

impl std::fmt::Display for TextError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TextError::Empty => write!(f, "must not be empty"),
            TextError::TooLong { max } => write!(f, "must be at most {max} characters"),
            TextError::Forbidden { ch } => write!(
                f,
                "must not contain control, bidirectional or invisible characters (found U+{:04X})",
                *ch as u32
            ),
        }
    }
}

/// Whether `c` may appear in recorded text: not a control (Cc), not a format character
/// (Cf: bidi controls, zero-width characters, tags, soft hyphen …), not a line or paragraph
/// separator (Zl, Zp), not a noncharacter, and not one of the blank-looking letters that
/// pass for nothing on screen.
pub fn allowed_char(c: char) -> bool {
    !(c.is_control()
        || matches!(c,
            // Cf, format characters
            '\u{00AD}'                 // soft hyphen
            | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
            | '\u{0890}'..='\u{0891}' | '\u{08E2}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'  // zero-width space/non-joiner/joiner, LRM, RLM
            | '\u{202A}'..='\u{202E}'  // LRE, RLE, PDF, LRO, RLO
            | '\u{2060}'..='\u{2064}'  // word joiner, invisible operators
            | '\u{2066}'..='\u{206F}'  // LRI, RLI, FSI, PDI, deprecated format characters
            | '\u{FEFF}'               // BOM / zero-width no-break space
            | '\u{FFF9}'..='\u{FFFB}'  // interlinear annotation controls
            | '\u{110BD}' | '\u{110CD}' | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}' | '\u{E0020}'..='\u{E007F}'  // language tag, tag characters
            // Zl, Zp
            | '\u{2028}' | '\u{2029}'
            // invisible or blank-looking: combining grapheme joiner, Hangul fillers,
            // braille blank, variation selectors
            | '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
            | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}'
        )
        || (c as u32 & 0xFFFE) == 0xFFFE      // noncharacters U+xFFFE, U+xFFFF
        || ('\u{FDD0}'..='\u{FDEF}').contains(&c))
}

/// Check `s`: 1..=`max_chars` characters, every one [`allowed_char`].
pub fn check(s: &str, max_chars: usize) -> Result<(), TextError> {
    if s.is_empty() {
        return Err(TextError::Empty);
    }
    let mut n = 0;
    for c in s.chars() {
        n += 1;
        if n > max_chars {
            return Err(TextError::TooLong { max: max_chars });
        }
        if !allowed_char(c) {
            return Err(TextError::Forbidden { ch: c });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_international_text_passes() {
        for s in [
            "abc",
            "req-42 / retry 3",
            "Zürich café",
            "東京",
            "emoji 🙂",
            "a\u{00A0}b",
        ] {
            assert_eq!(check(s, 64), Ok(()), "{s:?}");
        }
    }

    #[test]
    fn controls_bidi_and_invisibles_fail() {
        for c in [
            '\0',
            '\n',
            '\r',
            '\t',
            '\u{1B}',
            '\u{7F}',
            '\u{85}',
            '\u{9B}',
            '\u{061C}',
            '\u{200B}',
            '\u{200D}',
            '\u{200E}',
            '\u{200F}',
            '\u{202A}',
            '\u{202E}',
            '\u{2066}',
            '\u{2069}',
            '\u{2060}',
            '\u{FEFF}',
            '\u{FFF9}',
            '\u{2028}',
            '\u{2029}',
            '\u{00AD}',
            '\u{E0041}',
            '\u{180E}',
            '\u{034F}',
            '\u{1D173}',
            '\u{3164}',
            '\u{2800}',
            '\u{FFFE}',
            '\u{FE0F}',
        ] {
            let s = format!("ab{c}cd");
            assert_eq!(
                check(&s, 64),
                Err(TextError::Forbidden { ch: c }),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn length_counts_characters_and_empty_fails() {
        assert_eq!(check("", 3), Err(TextError::Empty));
        assert_eq!(check("äöü", 3), Ok(()));
        assert_eq!(check("äöüx", 3), Err(TextError::TooLong { max: 3 }));
    }
}
