//! ASL reference paths: `$`, `$.a.b`, `$.a[0]`, `$['a b']`, and `$$.` into the context object.
//! Filters, wildcards and slices are not reference paths and are refused.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Field(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    context: bool,
    segments: Vec<Segment>,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (context, rest) = if let Some(rest) = text.strip_prefix("$$") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix('$') {
            (false, rest)
        } else {
            return Err(format!("path {text:?} must start with $ or $$"));
        };
        let mut segments = Vec::new();
        let bytes: Vec<char> = rest.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                '.' => {
                    let start = i + 1;
                    let mut end = start;
                    while end < bytes.len() && bytes[end] != '.' && bytes[end] != '[' {
                        end += 1;
                    }
                    let name: String = bytes[start..end].iter().collect();
                    if name.is_empty() || name.contains(['*', '?', '@', '(', ')']) {
                        return Err(format!(
                            "path {text:?}: {name:?} is not a field name (only reference paths are supported)"
                        ));
                    }
                    segments.push(Segment::Field(name));
                    i = end;
                }
                '[' => {
                    let close = bytes[i..]
                        .iter()
                        .position(|c| *c == ']')
                        .map(|p| p + i)
                        .ok_or_else(|| format!("path {text:?}: unclosed ["))?;
                    let inner: String = bytes[i + 1..close].iter().collect();
                    if let Some(quoted) = inner.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
                        segments.push(Segment::Field(quoted.to_owned()));
                    } else if let Ok(index) = inner.parse::<usize>() {
                        segments.push(Segment::Index(index));
                    } else {
                        return Err(format!("path {text:?}: [{inner}] is not supported (only [n] and ['name'])"));
                    }
                    i = close + 1;
                }
                other => return Err(format!("path {text:?}: unexpected {other:?}")),
            }
        }
        Ok(Self { text: text.to_owned(), context, segments })
    }

    pub fn is_context(&self) -> bool {
        self.context
    }

    /// `$`: the whole input (the default InputPath and OutputPath).
    pub fn is_root(&self) -> bool {
        !self.context && self.segments.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value at the path, or `None` if any part is missing.
    pub fn get<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.segments.iter().try_fold(root, |value, segment| match segment {
            Segment::Field(name) => value.as_object()?.get(name),
            Segment::Index(index) => value.as_array()?.get(*index),
        })
    }

    /// Puts `value` at the path inside `root` (ResultPath), creating objects on the way.
    pub fn set(&self, root: Value, value: Value) -> Result<Value, String> {
        if self.context {
            return Err(format!("ResultPath {:?} cannot write to the context object", self.text));
        }
        fn place(target: Value, segments: &[Segment], value: Value, text: &str) -> Result<Value, String> {
            let Some((first, rest)) = segments.split_first() else {
                return Ok(value);
            };
            match first {
                Segment::Field(name) => {
                    let mut map = match target {
                        Value::Object(map) => map,
                        Value::Null => Map::new(),
                        other => {
                            return Err(format!("ResultPath {text:?}: cannot add field {name:?} to {other}"));
                        }
                    };
                    let child = map.remove(name).unwrap_or(Value::Null);
                    map.insert(name.clone(), place(child, rest, value, text)?);
                    Ok(Value::Object(map))
                }
                Segment::Index(_) => Err(format!("ResultPath {text:?}: array indexes are not supported in ResultPath")),
            }
        }
        place(root, &self.segments, value, &self.text)
    }

    /// Whether `output` is what `set(input, result)` gives, without building it: the check
    /// runs on every recorded task exit, and a copy of the input there was most of the local
    /// runner's recording cost.
    pub fn holds_set(&self, output: &Value, input: &Value, result: &Value) -> bool {
        fn holds(output: &Value, target: Option<&Value>, segments: &[Segment], result: &Value) -> bool {
            let Some((first, rest)) = segments.split_first() else {
                return output == result;
            };
            let (Segment::Field(name), Value::Object(out)) = (first, output) else {
                return false;
            };
            let target = match target {
                Some(Value::Object(map)) => Some(map),
                Some(Value::Null) | None => None,
                Some(_) => return false,
            };
            let Some(child) = out.get(name) else {
                return false;
            };
            let expected_len = target.map_or(1, |map| map.len() + usize::from(!map.contains_key(name)));
            out.len() == expected_len
                && holds(child, target.and_then(|map| map.get(name)), rest, result)
                && target.is_none_or(|map| map.iter().all(|(key, value)| key == name || out.get(key) == Some(value)))
        }
        !self.context && holds(output, Some(input), &self.segments, result)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// `holds_set` agrees with building the value with `set`, on the cases that matter.
    #[test]
    fn holds_set_agrees_with_set() {
        let inputs = [
            json!({"a": 1, "b": {"c": 2}}),
            json!({"a": 1}),
            json!({}),
            json!(null),
            json!({"b": 5}),
            json!({"b": {"c": 2, "d": [1, 2]}}),
        ];
        let results = [json!({"x": 1}), json!(7), json!(null), json!({"c": 2})];
        let others = [json!({"a": 1, "b": {"c": 2, "extra": 0}}), json!({"a": 2, "b": {"x": 1}}), json!([1]), json!(3)];
        for path in ["$", "$.b", "$.b.c", "$.new", "$.b.d"] {
            let path = JsonPath::parse(path).unwrap();
            for input in &inputs {
                for result in &results {
                    let Ok(built) = path.set(input.clone(), result.clone()) else {
                        assert!(!path.holds_set(&json!({}), input, result));
                        continue;
                    };
                    assert!(path.holds_set(&built, input, result), "{path:?} {input} {result}");
                    for other in &others {
                        assert_eq!(
                            path.holds_set(other, input, result),
                            *other == built,
                            "{path:?} {input} {result} {other}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reads_fields_indexes_and_quoted_names() {
        let doc = json!({"a": {"b": [10, {"c d": true}]}});
        assert_eq!(JsonPath::parse("$").unwrap().get(&doc), Some(&doc));
        assert_eq!(JsonPath::parse("$.a.b[0]").unwrap().get(&doc), Some(&json!(10)));
        assert_eq!(JsonPath::parse("$.a.b[1]['c d']").unwrap().get(&doc), Some(&json!(true)));
        assert_eq!(JsonPath::parse("$.a.missing").unwrap().get(&doc), None);
        assert!(JsonPath::parse("$$.Execution.Id").unwrap().is_context());
    }

    #[test]
    fn refuses_what_is_not_a_reference_path() {
        for bad in ["a.b", "$.a[*]", "$..a", "$.a[?(@.x)]", "$.a[1:2]", "$.a["] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn set_merges_and_replaces() {
        let path = JsonPath::parse("$.result.inner").unwrap();
        let merged = path.set(json!({"keep": 1}), json!("x")).unwrap();
        assert_eq!(merged, json!({"keep": 1, "result": {"inner": "x"}}));
        assert_eq!(JsonPath::parse("$").unwrap().set(json!({"a": 1}), json!(2)).unwrap(), json!(2));
        assert!(JsonPath::parse("$.a.b").unwrap().set(json!({"a": 3}), json!(1)).is_err());
    }
}
