//! Query pages read straight from DynamoDB's JSON into rows: the source reader's fast path.
//!
//! The SDK parses a Query page into one `HashMap<String, AttributeValue>` per item, an owned key
//! and value per attribute, which `page_of` then converts and drops: in the worker bench that
//! parse and conversion are most of the CPU. Here the SDK still does everything else of the call
//! (endpoint, signing, retries, timeouts, error answers): a per-call interceptor ([`StashBody`])
//! takes the body of a 200 answer while the SDK reads it, under the SDK's own timeouts, and hands
//! the SDK `{}` to parse. [`decode_page`] then reads that body with serde_json into rows of the
//! projected columns only, borrowing text from the page where it needs no unescaping, with the
//! conversion `page_of` uses (`source::convert`), so a cell reads the same either way.
//!
//! It takes and refuses what the SDK's generated deserializer does (the differential proptest in
//! `page_decoder/tests.rs` holds it to that): the answer is an object whose unknown members are
//! skipped; `Items` is null or an array of objects (a null item is an error); `Count` and
//! `ScannedCount` are null or whole numbers that fit an `i32`; an attribute value is an object with
//! exactly one non-null member (null members and `__type` are skipped, an unknown member is
//! `Unknown`, none or two are errors), and `S`/`N`/`B`/`SS`/`NS`/`BS`/`M`/`L`/`NULL`/`BOOL` hold
//! what their names say; `B` is base64 of the text as written (escaped text is not base64); a
//! repeated name keeps its last value; `CapacityUnits` is a number, or `NaN`/`Infinity` as a
//! string. The per-table and per-index breakdown of `ConsumedCapacity` is skipped unchecked:
//! DynamoDB sends it only for `ReturnConsumedCapacity=INDEXES`, and the reader asks for `TOTAL`.
//! Where the SDK's tokenizer is lenient with text no JSON writer makes (a number `0.`, a bad
//! escape inside a skipped value), this decoder refuses it: an error, never a different page.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use aws_sdk_dynamodb::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use http_body::{Body, Frame};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::source::{encode_cursor, Cells, Columns, Wire, UNKNOWN_KIND};
use crate::domain::Row;
use crate::ports::{Page, PortError, PortResult, SourceQuery};

/// What the SDK parses instead of the page: an answer with nothing in it.
const EMPTY_ANSWER: &[u8] = b"{}";
/// A `content-length` above this does not size the buffer up front (the body still reads whole).
const MAX_PRESIZE: usize = 16 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type Slot = Arc<Mutex<Option<Bytes>>>;

/// Takes the body of a Query's 200 answer for [`decode_page`] and leaves the SDK `{}` to parse.
/// One per call, so the slot is that call's alone; answers of any other status are untouched.
#[derive(Debug, Clone, Default)]
pub(super) struct StashBody(Slot);

impl StashBody {
    /// The page of the attempt that succeeded, if it was a 200.
    pub(super) fn take(&self) -> Option<Bytes> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

fn put(slot: &Mutex<Option<Bytes>>, page: Option<Bytes>) {
    *slot.lock().unwrap_or_else(PoisonError::into_inner) = page;
}

impl Intercept for StashBody {
    fn name(&self) -> &'static str {
        "StashBody"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let response = context.response_mut();
        if response.status().as_u16() != 200 {
            return Ok(());
        }
        // A retried call must not leave an earlier attempt's page behind.
        put(&self.0, None);
        let presize = response
            .headers()
            .get("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_PRESIZE);
        let body = std::mem::replace(response.body_mut(), SdkBody::taken());
        *response.body_mut() = match body.bytes() {
            // Already in memory (a replayed answer).
            Some(page) => {
                put(&self.0, Some(Bytes::copy_from_slice(page)));
                SdkBody::from(Bytes::from_static(EMPTY_ANSWER))
            }
            // Still on the wire: read while the SDK reads the body, so its attempt timeout and
            // stalled-stream protection cover the page as they would cover its own parse.
            None => SdkBody::from_body_1_x(Drain {
                inner: body,
                page: Vec::with_capacity(presize),
                slot: self.0.clone(),
                done: false,
            }),
        };
        Ok(())
    }
}

/// A body that reads the answer to its end into the slot, then yields `{}`.
struct Drain {
    inner: SdkBody,
    page: Vec<u8>,
    slot: Slot,
    done: bool,
}

impl Body for Drain {
    type Data = Bytes;
    type Error = aws_smithy_types::body::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        while !this.done {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers carry nothing of the page (the SDK's own read drops them too).
                    if let Ok(data) = frame.into_data() {
                        this.page.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.done = true;
                    put(
                        &this.slot,
                        Some(Bytes::from(std::mem::take(&mut this.page))),
                    );
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(EMPTY_ANSWER)))));
                }
            }
        }
        Poll::Ready(None)
    }
}

/// A Query answer's JSON as a page of rows of the query's columns, in order, with the cursor
/// after them and the read capacity it used: what `page_of` makes of the SDK's parse of the
/// same body, row by row, cursor and errors alike.
pub fn decode_page(q: &SourceQuery, body: &[u8]) -> PortResult<Page> {
    // The SDK reads an empty body as an empty answer.
    let body = if body.is_empty() { EMPTY_ANSWER } else { body };
    let columns = Columns::new(&q.columns);
    let mut de = serde_json::Deserializer::from_slice(body);
    let answer = DocSeed(&columns)
        .deserialize(&mut de)
        .and_then(|answer| de.end().map(|()| answer))
        .map_err(|e| {
            PortError::failed(
                "source query",
                format!("the Query answer is not DynamoDB JSON: {e}"),
                false,
            )
        })?;
    // In page_of's order: the cursor's error before any cell's.
    let next = match answer.key {
        Some(k) if !k.is_empty() => Some(encode_cursor(k)?),
        _ => None,
    };
    if let Some(e) = answer.error {
        return Err(e);
    }
    Ok(Page {
        rows: answer.rows,
        next,
        read_capacity: answer.capacity.unwrap_or(0.0),
    })
}

/// What the answer holds once read.
#[derive(Default)]
struct Answer<'de> {
    rows: Vec<Row>,
    /// The first data error, in page_of's order (items in order, columns in order).
    error: Option<PortError>,
    key: Option<BTreeMap<String, Wire<'de>>>,
    capacity: Option<f64>,
}

struct DocSeed<'c, 'q>(&'c Columns<'q>);

impl<'de> DeserializeSeed<'de> for DocSeed<'_, '_> {
    type Value = Answer<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_, '_> {
    type Value = Answer<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Query answer object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut answer = Answer::default();
        while let Some(name) = map.next_key::<Text>()? {
            match name.0.as_ref() {
                "Items" => {
                    (answer.rows, answer.error) = map.next_value_seed(ItemsSeed(self.0))?;
                }
                "Count" | "ScannedCount" => {
                    map.next_value::<Option<Count>>()?;
                }
                "LastEvaluatedKey" => {
                    answer.key = map.next_value::<Option<Key>>()?.map(|k| k.0);
                }
                "ConsumedCapacity" => {
                    answer.capacity = map.next_value::<Option<Capacity>>()?.and_then(|c| c.0);
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(answer)
    }
}

/// `Items`: null, or an array of items.
struct ItemsSeed<'c, 'q>(&'c Columns<'q>);

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_, '_> {
    type Value = (Vec<Row>, Option<PortError>);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_, '_> {
    type Value = (Vec<Row>, Option<PortError>);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of items or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok((Vec::new(), None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut rows = Vec::new();
        let mut error = None;
        while let Some(item) = seq.next_element_seed(ItemSeed(self.0))? {
            match item {
                Ok(row) => rows.push(row),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        Ok((rows, error))
    }
}

/// One item, as a row of the columns; a cell that does not convert is the item's error (the
/// first in column order), carried on so a later JSON error still wins, as it does in the SDK.
struct ItemSeed<'c, 'q>(&'c Columns<'q>);

impl<'de> DeserializeSeed<'de> for ItemSeed<'_, '_> {
    type Value = PortResult<Row>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_, '_> {
    type Value = PortResult<Row>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an item object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let columns = self.0;
        let mut cells = Cells::new(columns.len());
        let mut from = 0;
        while let Some(name) = map.next_key::<Text>()? {
            let value = map.next_value::<Attr>()?.0;
            if let Some((found, column)) = columns.find(&name.0, from) {
                from = found + 1;
                cells.set(column, columns.convert(column, value));
            }
        }
        Ok(cells.finish())
    }
}

/// Text from the page: borrowed where the JSON string has no escapes, else unescaped.
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// One attribute value (a union of one member); never null.
struct Attr<'de>(Wire<'de>);

impl<'de> Deserialize<'de> for Attr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(AttrVisitor)
    }
}

struct AttrVisitor;

impl<'de> Visitor<'de> for AttrVisitor {
    type Value = Attr<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an attribute value object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut variant: Option<Wire<'de>> = None;
        while let Some(name) = map.next_key::<Text>()? {
            let value = match name.0.as_ref() {
                "S" => map.next_value::<Option<Text>>()?.map(|t| Wire::S(t.0)),
                "N" => map.next_value::<Option<Text>>()?.map(|t| Wire::N(t.0)),
                "BOOL" => map.next_value::<Option<bool>>()?.map(Wire::Bool),
                "NULL" => map.next_value::<Option<bool>>()?.map(Wire::Null),
                "B" => map
                    .next_value::<Option<Binary>>()?
                    .map(|_| Wire::Other("B")),
                "SS" => map
                    .next_value::<Option<Vec<Text>>>()?
                    .map(|_| Wire::Other("SS")),
                "NS" => map
                    .next_value::<Option<Vec<Text>>>()?
                    .map(|_| Wire::Other("NS")),
                "BS" => map
                    .next_value::<Option<Vec<Binary>>>()?
                    .map(|_| Wire::Other("BS")),
                "M" => map
                    .next_value::<Option<MapAttr>>()?
                    .map(|_| Wire::Other("M")),
                "L" => map
                    .next_value::<Option<ListAttr>>()?
                    .map(|_| Wire::Other("L")),
                "__type" => {
                    map.next_value::<Skip>()?;
                    continue;
                }
                _ => map
                    .next_value::<Option<Skip>>()?
                    .map(|_| Wire::Other(UNKNOWN_KIND)),
            };
            if value.is_some() {
                if variant.is_some() {
                    return Err(de::Error::custom("encountered mixed variants in union"));
                }
                variant = value;
            }
        }
        variant
            .map(Attr)
            .ok_or_else(|| de::Error::custom("Union did not contain a valid variant."))
    }
}

/// Any JSON value, read to check it and dropped. Unlike serde's `IgnoredAny`, which skips the
/// text of strings unread, it checks strings as UTF-8, as the SDK's tokenizer does.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_none<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_key::<Text>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(Skip)
    }
}

/// `B`: base64 of the text as written, as the SDK decodes it (an escape is not base64).
/// Checked, then dropped: no column takes a binary.
struct Binary;

impl<'de> Deserialize<'de> for Binary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Text::deserialize(d)?.0 {
            Cow::Borrowed(t) => aws_smithy_types::base64::decode(t)
                .map(|_| Binary)
                .map_err(|e| de::Error::custom(format!("failed to decode base64: {e}"))),
            Cow::Owned(_) => Err(de::Error::custom("failed to decode base64: escaped text")),
        }
    }
}

/// `M`: attribute values by name, each checked as the SDK would read it, then dropped.
struct MapAttr;

impl<'de> Deserialize<'de> for MapAttr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MapAttr;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of attribute values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_key::<Text>()?.is_some() {
                    map.next_value::<Attr>()?;
                }
                Ok(MapAttr)
            }
        }
        d.deserialize_map(V)
    }
}

/// `L`: a list of attribute values, checked, then dropped.
struct ListAttr;

impl<'de> Deserialize<'de> for ListAttr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ListAttr;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of attribute values")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<Attr>()?.is_some() {}
                Ok(ListAttr)
            }
        }
        d.deserialize_seq(V)
    }
}

/// `LastEvaluatedKey`: attribute values by name, in name order.
struct Key<'de>(BTreeMap<String, Wire<'de>>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(name) = map.next_key::<Text>()? {
                    let value = map.next_value::<Attr>()?.0;
                    out.insert(name.0.into_owned(), value);
                }
                Ok(Key(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `Count`, `ScannedCount`: a whole number that fits an `i32` (`3.0` does, as in the SDK).
struct Count;

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a count")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                i32::try_from(v)
                    .map(|_| Count)
                    .map_err(|_| E::custom("count out of range"))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                i32::try_from(v)
                    .map(|_| Count)
                    .map_err(|_| E::custom("count out of range"))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                if f64::from(v as i32) == v {
                    Ok(Count)
                } else {
                    Err(E::custom("count is not a whole number"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `ConsumedCapacity`: its `CapacityUnits`, with the other members type-checked as the SDK
/// does, except the breakdown `TOTAL` never brings.
struct Capacity(Option<f64>);

impl<'de> Deserialize<'de> for Capacity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Capacity;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a consumed capacity object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut units = None;
                while let Some(name) = map.next_key::<Text>()? {
                    match name.0.as_ref() {
                        "CapacityUnits" => units = map.next_value::<Option<Units>>()?.map(|u| u.0),
                        "ReadCapacityUnits" | "WriteCapacityUnits" => {
                            map.next_value::<Option<Units>>()?;
                        }
                        "TableName" => {
                            map.next_value::<Option<Text>>()?;
                        }
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(Capacity(units))
            }
        }
        d.deserialize_map(V)
    }
}

/// Capacity units: a number, or as a string only what is not finite (`NaN`, `Infinity`, ...), the
/// SDK's rule for a JSON double.
struct Units(f64);

impl<'de> Deserialize<'de> for Units {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Units;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Units, E> {
                Ok(Units(v as f64))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Units, E> {
                Ok(Units(v as f64))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Units, E> {
                Ok(Units(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Units, E> {
                let f = match v {
                    "Infinity" => f64::INFINITY,
                    "-Infinity" => f64::NEG_INFINITY,
                    "NaN" => f64::NAN,
                    other => other
                        .parse::<f64>()
                        .map_err(|_| E::custom("expected a number"))?,
                };
                if f.is_finite() {
                    return Err(E::custom("a finite number must not be a string"));
                }
                Ok(Units(f))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests;
