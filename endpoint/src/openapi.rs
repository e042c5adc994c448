//! The OpenAPI 3.1 description of the endpoint (`GET /openapi.json`, as vLLM serves it): the
//! request bodies with the limits the server enforces, and the responses it gives, so that
//! clients can be generated from it and schema-driven fuzzers (`scripts/fuzz_endpoint.py`,
//! schemathesis) can exercise every route. `ROUTES` is the list both sides are checked against:
//! the unit test below (the document describes exactly these) and `endpoint/tests/t01` (the
//! server answers each of them).

use serde_json::{json, Value};

/// The routes of the router, as (method, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("get", "/v1/models"),
    ("get", "/metrics"),
    ("get", "/version"),
    ("get", "/openapi.json"),
    ("get", "/health"),
];

/// The document for a server whose limits are `max_n` choices and `stop` lists of `max_stops`.
pub fn document(max_n: usize, max_stops: usize) -> Value {
    let error = json!({"$ref": "#/components/responses/Error"});
    let errors = |ok: Value| {
        json!({
            "200": ok,
            "400": error, "401": error, "404": error, "413": error,
            "429": error, "500": error, "503": error
        })
    };
    let generation = |schema: &str, chunk: &str| {
        json!({
            "description": "The generation; with `stream: true`, server-sent events of chunks, an error event if the engine failed, the usage chunk when asked, then `data: [DONE]`",
            "content": {
                "application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
                "text/event-stream": {
                    // Each event: `data` is a chunk (x-chunk), an error object or `[DONE]`.
                    "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}},
                    "x-chunk": {"$ref": format!("#/components/schemas/{chunk}")}
                }
            }
        })
    };
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let token_ids = json!({"type": "array", "items": {"type": "integer", "minimum": 0}});
    let usage = json!({"$ref": "#/components/schemas/Usage"});
    let finish = json!({"type": ["string", "null"], "enum": ["stop", "length", "abort", "error", null]});
    let max_logprobs = crate::generation::MAX_LOGPROBS;
    let completion_logprobs = json!({"oneOf": [{"type": "null"}, {"type": "object",
    "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
        "top_logprobs": {"type": "array", "items": {"type": ["object", "null"], "additionalProperties": {"type": "number"}}},
        "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}}
    }}]});
    let top_logprob = json!({"type": "object", "required": ["token", "logprob", "bytes"], "properties": {
        "token": {"type": "string"}, "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}
    }});
    let chat_logprobs = json!({"oneOf": [{"type": "null"}, {"type": "object", "required": ["content"], "properties": {
        "content": {"type": "array", "items": {"type": "object", "required": ["token", "logprob", "bytes", "top_logprobs"], "properties": {
            "token": {"type": "string"}, "logprob": {"type": "number"},
            "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
            "top_logprobs": {"type": "array", "items": top_logprob}
        }}}
    }}]});
    // Fields both generation routes take (vLLM's extensions marked).
    let sampling = json!({
        "model": {"type": "string", "description": "The served model's name (404 for another)"},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "description": "Default: up to the model's context length"},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2, "description": "0 is greedy"},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": -1, "description": "-1 or 0: off"},
        "seed": {"type": ["integer", "null"], "minimum": 0},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": max_n},
        "stop": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": max_stops},
            {"type": "null"}
        ]},
        "stop_token_ids": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}, "description": "vLLM extension: ids (inside the vocabulary) that end a sequence"},
        "ignore_eos": {"type": "boolean", "description": "vLLM extension: generate past EOS"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}, "description": "Only with stream: true"},
        "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2, "description": "Subtracted from a token's logit per time it was generated"},
        "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2, "description": "Subtracted once from the logit of every generated token"},
        "repetition_penalty": {"type": ["number", "null"], "exclusiveMinimum": 0, "description": "vLLM extension: logits of prompt and generated tokens divided by it (positive) or multiplied (negative); 1 is off"},
        "return_token_ids": {"type": "boolean", "description": "vLLM extension: prompt and generated token ids in each choice"}
    });
    let with = |extra: Value| {
        let mut props = sampling.as_object().cloned().unwrap_or_default();
        if let Value::Object(m) = extra {
            props.extend(m);
        }
        Value::Object(props)
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "MoEless inference endpoint (OpenAI-compatible)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every route but /health needs `Authorization: Bearer KEY` when the server was started with --api-key."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/completions": {"post": {
                "summary": "Text completion",
                "requestBody": body("CompletionRequest"),
                "responses": errors(generation("Completion", "Completion"))
            }},
            "/v1/chat/completions": {"post": {
                "summary": "Chat completion (the model's chat template renders the messages)",
                "requestBody": body("ChatRequest"),
                "responses": errors(generation("ChatCompletion", "ChatCompletionChunk"))
            }},
            "/v1/models": {"get": {
                "summary": "The served model",
                "responses": errors(json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}}))
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (moeless: prefix, vLLM's names)",
                "responses": errors(json!({"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}))
            }},
            "/version": {"get": {
                "summary": "Server version",
                "responses": errors(json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}}}}}))
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": errors(json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}))
            }},
            "/health": {"get": {
                "summary": "200 while the engine runs, 503 once it stopped (no key needed)",
                "security": [],
                "responses": {"200": {"description": "Serving"}, "503": {"description": "The engine stopped"}}
            }}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {
                "description": "An OpenAI-shaped error (429 and 503 carry Retry-After)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            }},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["integer", "string", "null"]}
                    }
                }}},
                "CompletionRequest": {
                    "type": "object",
                    "required": ["prompt"],
                    "properties": with(json!({
                        "prompt": {"oneOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                            {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}, "minItems": 1}
                        ], "description": "Text, texts, token ids or lists of token ids (ids inside the vocabulary)"},
                        "echo": {"type": "boolean", "description": "Each choice's text starts with its prompt (streaming: one chunk per choice before the first token)"},
                        "logprobs": {"oneOf": [
                            {"type": "integer", "minimum": 0, "maximum": max_logprobs},
                            {"const": false},
                            {"type": "null"}
                        ], "description": "Log-probability of each generated token and this many alternatives (of the model's raw distribution); with echo, of the prompt's tokens too (the first null; not streamed)"}
                    }))
                },
                "ChatMessage": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {
                        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
                        "content": {"oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
                            {"type": "null"}
                        ]}
                    },
                    "additionalProperties": true
                },
                "ChatRequest": {
                    "type": "object",
                    "required": ["messages"],
                    "properties": with(json!({
                        "messages": {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1},
                        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "description": "Wins over max_tokens"},
                        "tools": {"description": "Passed to the chat template"},
                        "add_generation_prompt": {"type": ["boolean", "null"], "description": "vLLM extension (default true)"},
                        "chat_template_kwargs": {"type": ["object", "null"], "description": "vLLM extension: extra template variables"},
                        "logprobs": {"type": ["boolean", "null"], "description": "Log-probability of each generated token (of the model's raw distribution)"},
                        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": max_logprobs, "description": "Alternatives per token; above 0 needs logprobs: true"}
                    }))
                },
                "Usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
                    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}
                }},
                "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
                    "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "text", "finish_reason"], "properties": {
                        "index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": completion_logprobs, "finish_reason": finish,
                        "prompt_token_ids": token_ids, "token_ids": token_ids
                    }}},
                    "usage": usage
                }},
                "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
                    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "message", "finish_reason"], "properties": {
                        "index": {"type": "integer"},
                        "message": {"type": "object", "required": ["role", "content"], "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
                        "logprobs": chat_logprobs, "finish_reason": finish, "token_ids": token_ids
                    }}},
                    "usage": usage,
                    "prompt_token_ids": token_ids
                }},
                "ChatCompletionChunk": {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
                    "id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "created": {"type": "integer"}, "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "delta"], "properties": {
                        "index": {"type": "integer"},
                        "delta": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}},
                        "logprobs": chat_logprobs, "finish_reason": finish, "token_ids": token_ids
                    }}},
                    "usage": usage
                }},
                "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": {"type": "object", "required": ["id", "object", "created", "owned_by", "max_model_len"], "properties": {
                        "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}
                    }}}
                }}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_and_resolves_every_reference() {
        let doc = document(8, 4);
        let paths = doc["paths"].as_object().expect("paths");
        let mut described: Vec<(String, String)> = paths
            .iter()
            .flat_map(|(p, ops)| {
                ops.as_object()
                    .into_iter()
                    .flatten()
                    .map(move |(m, _)| (m.clone(), p.clone()))
            })
            .collect();
        described.sort();
        let mut routes: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        routes.sort();
        assert_eq!(described, routes);
        // Every `$ref` points at something the document defines.
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 10);
        for r in all {
            let pointer = r.strip_prefix('#').expect("local reference");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
        assert_eq!(
            doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/CompletionRequest"
        );
        assert_eq!(
            doc["components"]["schemas"]["ChatRequest"]["properties"]["n"]["maximum"],
            8
        );
    }
}
