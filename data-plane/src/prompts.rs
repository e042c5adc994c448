//! The prompts file of `moeless forward` / `generate`: `{"prompts": [[ids...], ...]}`, the
//! format of `prompts.json` in the golden reference data.

#[derive(Debug, thiserror::Error)]
pub enum PromptsError {
    #[error("prompts file is not valid JSON: {0}")]
    Json(String),
    #[error("prompts file must be an object with a `prompts` list")]
    MissingList,
    #[error("prompts[{index}] must be a list of token ids (non-negative integers below 2^32)")]
    NotIds { index: usize },
    #[error("prompts[{index}] is empty; every prompt needs at least one token")]
    Empty { index: usize },
}

/// Parses the text of a prompts file.
pub fn parse_prompts(text: &str) -> Result<Vec<Vec<u32>>, PromptsError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| PromptsError::Json(e.to_string()))?;
    let list = v
        .get("prompts")
        .and_then(|p| p.as_array())
        .ok_or(PromptsError::MissingList)?;
    list.iter()
        .enumerate()
        .map(|(index, p)| {
            let ids = p
                .as_array()
                .ok_or(PromptsError::NotIds { index })?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or(PromptsError::NotIds { index })
                })
                .collect::<Result<Vec<u32>, _>>()?;
            if ids.is_empty() {
                return Err(PromptsError::Empty { index });
            }
            Ok(ids)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            parse_prompts(r#"{"prompts": [[1, 2], [3]]}"#).unwrap(),
            vec![vec![1, 2], vec![3]]
        );
        assert!(matches!(parse_prompts("nope"), Err(PromptsError::Json(_))));
        assert!(matches!(parse_prompts(r#"{"p": []}"#), Err(PromptsError::MissingList)));
        assert!(matches!(
            parse_prompts(r#"{"prompts": [[1], [-1]]}"#),
            Err(PromptsError::NotIds { index: 1 })
        ));
        assert!(matches!(
            parse_prompts(r#"{"prompts": [[1.5]]}"#),
            Err(PromptsError::NotIds { index: 0 })
        ));
        assert!(matches!(
            parse_prompts(r#"{"prompts": [[]]}"#),
            Err(PromptsError::Empty { index: 0 })
        ));
    }
}
