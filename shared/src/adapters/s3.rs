//! S3: multipart uploads of export files, manifests, and presigned downloads.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use sha2::{Digest, Sha256};

use super::IamResource::ExportObjects;
use super::{sdk_error, IamNeed};
use crate::domain::UploadedPart;
use crate::ports::{ObjectStore, PortError, PortResult};

/// IAM needs of the file store's methods (see [`IamNeed`]): the multipart calls are authorised
/// by `s3:PutObject`, and a presigned URL carries the signer's `s3:GetObject`.
#[rustfmt::skip]
pub const FILES_IAM: &[IamNeed] = &[
    IamNeed::new("files", "start_upload", &["create_multipart_upload"], &["s3:PutObject"], ExportObjects),
    IamNeed::new("files", "upload_part", &["upload_part"], &["s3:PutObject"], ExportObjects),
    IamNeed::new("files", "copy_part", &["upload_part_copy"], &["s3:GetObject", "s3:PutObject"], ExportObjects),
    IamNeed::new("files", "complete_upload", &["complete_multipart_upload"], &["s3:PutObject"], ExportObjects),
    IamNeed::new("files", "abort_upload", &["abort_multipart_upload"], &["s3:AbortMultipartUpload"], ExportObjects),
    IamNeed::new("files", "put_object", &["put_object"], &["s3:PutObject"], ExportObjects),
    IamNeed::new("files", "digest", &["get_object"], &["s3:GetObject"], ExportObjects),
    IamNeed::new("files", "presign_get", &["get_object"], &["s3:GetObject"], ExportObjects),
    IamNeed::new("files", "get_object", &["get_object"], &["s3:GetObject"], ExportObjects),
    IamNeed::new("files", "delete_object", &["delete_object"], &["s3:DeleteObject"], ExportObjects),
];

#[derive(Clone)]
pub struct S3Files {
    client: Client,
    bucket: String,
}

impl S3Files {
    pub fn new(client: Client, bucket: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_string(),
        }
    }
}

/// `bucket/key` as `x-amz-copy-source` wants it: URL-encoded, `/` kept.
fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = format!("{bucket}/");
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `attachment; filename="..."` with the name made safe for the header.
fn disposition(file_name: &str) -> String {
    let safe: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("attachment; filename=\"{safe}\"")
}

#[async_trait]
impl ObjectStore for S3Files {
    async fn start_upload(
        &self,
        key: &str,
        content_type: &str,
        file_name: &str,
    ) -> PortResult<String> {
        let resp = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_disposition(disposition(file_name))
            .send()
            .await
            .map_err(|e| sdk_error("start upload", e))?;
        resp.upload_id
            .ok_or_else(|| PortError::failed("start upload", "no upload id returned", true))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Vec<u8>,
    ) -> PortResult<String> {
        let resp = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| sdk_error("upload part", e))?;
        resp.e_tag
            .ok_or_else(|| PortError::failed("upload part", "no ETag returned", true))
    }

    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        (first, last): (u64, u64),
    ) -> PortResult<String> {
        let resp = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(copy_source(&self.bucket, source))
            .copy_source_range(format!("bytes={first}-{last}"))
            .send()
            .await
            .map_err(|e| sdk_error("copy part", e))?;
        resp.copy_part_result
            .and_then(|r| r.e_tag)
            .ok_or_else(|| PortError::failed("copy part", "no ETag returned", true))
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> PortResult<()> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number)
                            .e_tag(&p.etag)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .send()
            .await
            .map_err(|e| sdk_error("complete upload", e))?;
        Ok(())
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> PortResult<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| sdk_error("abort upload", e))?;
        Ok(())
    }

    async fn put_object(&self, key: &str, body: Vec<u8>, content_type: &str) -> PortResult<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| sdk_error("put object", e))?;
        Ok(())
    }

    async fn digest(&self, key: &str) -> PortResult<(u64, String)> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("read object", e))?;
        let mut body = resp.body;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| PortError::failed("read object", e.to_string(), true))?
        {
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((size, hex::encode(hasher.finalize())))
    }

    async fn get_object(&self, key: &str) -> PortResult<Vec<u8>> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("read object", e))?;
        let bytes = resp
            .body
            .collect()
            .await
            .map_err(|e| PortError::failed("read object", e.to_string(), true))?;
        Ok(bytes.into_bytes().to_vec())
    }

    async fn delete_object(&self, key: &str) -> PortResult<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("delete object", e))?;
        Ok(())
    }

    async fn presign_get(&self, key: &str, file_name: &str, ttl: Duration) -> PortResult<String> {
        let conf = PresigningConfig::expires_in(ttl)
            .map_err(|e| PortError::failed("presign", e.to_string(), false))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .response_content_disposition(disposition(file_name))
            .presigned(conf)
            .await
            .map_err(|e| sdk_error("presign", e))?;
        Ok(req.uri().to_string())
    }
}

#[cfg(test)]
mod tests {
    use aws_smithy_http_client::test_util::StaticReplayClient;

    use super::*;
    use crate::adapters::testkit::{answer, answering, s3};

    const KEY: &str = "exports/acme/orders/k1/j1.csv";

    fn files(http: &StaticReplayClient) -> S3Files {
        S3Files::new(s3(http), "exports-test")
    }

    /// What an S3 request carried.
    struct Sent {
        method: String,
        path: String,
        query: Vec<(String, String)>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Sent {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn param(&self, name: &str) -> Option<&str> {
            self.query
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    fn parts_of(uri: &str) -> (String, Vec<(String, String)>) {
        let uri: http::Uri = uri.parse().unwrap();
        let query = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
        (uri.path().to_string(), query)
    }

    /// An S3 result document about the object `KEY`.
    fn result(root: &str, more: &str) -> http::Response<aws_smithy_types::body::SdkBody> {
        let xml = format!("<{root}><Bucket>exports-test</Bucket><Key>{KEY}</Key>{more}</{root}>");
        answer(200, &[], &xml)
    }

    /// The one request sent, which must be `method` on the object `KEY`.
    fn only_request(http: &StaticReplayClient, method: &str) -> Sent {
        let sent: Vec<Sent> = http
            .actual_requests()
            .map(|r| {
                let (path, query) = parts_of(r.uri());
                Sent {
                    method: r.method().to_string(),
                    path,
                    query,
                    headers: r
                        .headers()
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect(),
                    body: r.body().bytes().unwrap_or_default().to_vec(),
                }
            })
            .collect();
        assert_eq!(sent.len(), 1);
        let sent = sent.into_iter().next().unwrap();
        assert_eq!(
            (sent.method.as_str(), sent.path.as_str()),
            (method, format!("/exports-test/{KEY}").as_str())
        );
        sent
    }

    #[tokio::test]
    async fn start_upload_creates_a_multipart_upload_named_for_download() {
        let http = answering(vec![result(
            "InitiateMultipartUploadResult",
            "<UploadId>u-1</UploadId>",
        )]);
        let id = files(&http)
            .start_upload(KEY, "text/csv; charset=utf-8", "orders-20240501-093000.csv")
            .await
            .unwrap();
        assert_eq!(id, "u-1");
        let sent = only_request(&http, "POST");
        assert_eq!(sent.param("uploads"), Some(""));
        assert_eq!(sent.header("content-type"), Some("text/csv; charset=utf-8"));
        assert_eq!(
            sent.header("content-disposition"),
            Some("attachment; filename=\"orders-20240501-093000.csv\"")
        );
    }

    #[tokio::test]
    async fn upload_part_sends_the_bytes_as_numbered_part_of_the_upload() {
        let http = answering(vec![answer(200, &[("ETag", "\"etag-2\"")], "")]);
        let etag = files(&http)
            .upload_part(KEY, "u-1", 2, b"a,b\n1,2\n".to_vec())
            .await
            .unwrap();
        assert_eq!(etag, "\"etag-2\"");
        let sent = only_request(&http, "PUT");
        assert_eq!(sent.param("partNumber"), Some("2"));
        assert_eq!(sent.param("uploadId"), Some("u-1"));
        assert_eq!(sent.body, b"a,b\n1,2\n");
        assert_eq!(sent.header("content-length"), Some("8"));
    }

    #[tokio::test]
    async fn complete_upload_lists_the_parts_in_order_with_their_etags() {
        let http = answering(vec![result(
            "CompleteMultipartUploadResult",
            "<ETag>\"x-2\"</ETag>",
        )]);
        let parts = [
            UploadedPart {
                number: 1,
                etag: "\"e1\"".into(),
                size: 5,
            },
            UploadedPart {
                number: 2,
                etag: "\"e2\"".into(),
                size: 3,
            },
        ];
        files(&http)
            .complete_upload(KEY, "u-1", &parts)
            .await
            .unwrap();
        let sent = only_request(&http, "POST");
        assert_eq!(sent.param("uploadId"), Some("u-1"));
        let body = String::from_utf8(sent.body).unwrap();
        let listed: Vec<&str> = body
            .split("<Part>")
            .skip(1)
            .map(|p| p.split("</Part>").next().unwrap())
            .collect();
        assert_eq!(
            listed,
            [
                "<ETag>&quot;e1&quot;</ETag><PartNumber>1</PartNumber>",
                "<ETag>&quot;e2&quot;</ETag><PartNumber>2</PartNumber>",
            ],
            "{body}"
        );
    }

    #[tokio::test]
    async fn abort_upload_deletes_the_upload_not_the_object() {
        let http = answering(vec![answer(204, &[], "")]);
        files(&http).abort_upload(KEY, "u-1").await.unwrap();
        let sent = only_request(&http, "DELETE");
        assert_eq!(sent.param("uploadId"), Some("u-1"));
    }

    #[tokio::test]
    async fn presign_get_signs_a_download_with_its_name_and_lifetime_without_a_request() {
        let http = answering(vec![]);
        let url = files(&http)
            .presign_get(KEY, "orders-20240501-093000.csv", Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(http.actual_requests().count(), 0);
        let (path, query) = parts_of(&url);
        assert!(
            url.starts_with("https://s3.us-east-1.amazonaws.com/"),
            "{url}"
        );
        assert_eq!(path, format!("/exports-test/{KEY}"));
        let param = |name: &str| {
            query
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(param("X-Amz-Expires"), Some("600"));
        assert_eq!(
            param("response-content-disposition"),
            Some("attachment; filename=\"orders-20240501-093000.csv\"")
        );
        assert_eq!(param("X-Amz-Algorithm"), Some("AWS4-HMAC-SHA256"));
        assert!(
            param("X-Amz-Signature").is_some_and(|s| s.len() == 64),
            "{url}"
        );
    }

    #[test]
    fn disposition_cannot_break_the_header() {
        assert_eq!(
            disposition("orders-20240101-000000.csv"),
            "attachment; filename=\"orders-20240101-000000.csv\""
        );
        assert_eq!(
            disposition("a\"b\r\nc.csv"),
            "attachment; filename=\"a_b__c.csv\""
        );
    }
}
