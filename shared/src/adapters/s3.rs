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
    IamNeed::new("files", "complete_upload", &["complete_multipart_upload"], &["s3:PutObject"], ExportObjects),
    IamNeed::new("files", "abort_upload", &["abort_multipart_upload"], &["s3:AbortMultipartUpload"], ExportObjects),
    IamNeed::new("files", "put_object", &["put_object"], &["s3:PutObject"], ExportObjects),
    IamNeed::new("files", "digest", &["get_object"], &["s3:GetObject"], ExportObjects),
    IamNeed::new("files", "presign_get", &["get_object"], &["s3:GetObject"], ExportObjects),
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
    use super::*;

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
