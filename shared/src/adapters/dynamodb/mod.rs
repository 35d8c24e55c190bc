//! DynamoDB, as two adapters: the metadata store (`metadata`: jobs, entries, markers,
//! generations, counters, in one table) and the source reader (`source`: rows, read by Query on
//! the tenant partition; `page_decoder` reads its pages' JSON straight into rows). Attribute
//! helpers both use live here.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

pub mod metadata;
pub mod page_decoder;
pub mod source;

pub use metadata::{MetaStore, META_IAM};
pub use page_decoder::decode_page;
pub use source::{page_of, to_value, DynamoSource, QueryAnswer, SOURCE_IAM};

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &Item, name: &str) -> u64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A write whose condition did not hold.
fn is_condition_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}
