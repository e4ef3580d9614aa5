//! Files between a remote API caller and a guest, streamed through the host:
//! `PUT /api/v1/vms/{vm}/files?path=` and `GET /api/v1/vms/{vm}/files?path=`.
//!
//! An upload's body goes, as it arrives, to a staged file in the host's state
//! directory ([`ops::upload`]), which is then copied to the guest; the answer comes
//! once the guest verified size and SHA-256, and is the transfer. A download is
//! copied from the guest to a staged file and verified ([`ops::download`]), then
//! sent back with its size as `Content-Length` and its SHA-256 in
//! `X-Vmc-Sha256`. Staged files are removed whatever happens (a download's as
//! soon as it is open, so a caller who goes away leaves nothing behind). A body
//! that stalls for [`IDLE_TIMEOUT`] ends the upload.

use super::wire::{self, FileQuery};
use super::{Answer, JsonError};
use crate::api::ops::{self, ApiError};
use crate::engine::Engine;
use actix_web::http::header;
use actix_web::{web, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// An upload whose body sends nothing for this long is abandoned.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The size of the pieces a download is sent in.
const DOWNLOAD_CHUNK: usize = 256 * 1024;

/// The header carrying a download's SHA-256, lowercase hex.
pub const SHA256_HEADER: &str = "X-Vmc-Sha256";

/// The header carrying the id of the transfer behind a download.
pub const TRANSFER_HEADER: &str = "X-Vmc-Transfer-Id";

pub async fn upload(
    engine: web::Data<Engine>,
    vm: web::Path<String>,
    query: web::Query<FileQuery>,
    payload: web::Payload,
) -> Answer {
    let body = futures_util::stream::unfold(payload, |mut payload| async move {
        match tokio::time::timeout(IDLE_TIMEOUT, payload.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), payload)),
            Ok(Some(Err(e))) => Some((Err(e.to_string()), payload)),
            Ok(None) => None,
            Err(_) => Some((
                Err(format!("nothing arrived for {} s", IDLE_TIMEOUT.as_secs())),
                payload,
            )),
        }
    });
    let record = ops::upload(&engine, &vm, &query.path, Box::pin(body)).await?;
    Ok(HttpResponse::Ok().json(wire::Transfer::from(&record)))
}

pub async fn download(
    engine: web::Data<Engine>,
    vm: web::Path<String>,
    query: web::Query<FileQuery>,
) -> Answer {
    let download = ops::download(&engine, &vm, &query.path).await?;
    let staging = |source| {
        JsonError::Api(ApiError::Staging {
            path: download.file.path().to_owned(),
            source,
        })
    };
    let file = tokio::fs::File::open(download.file.path())
        .await
        .map_err(staging)?;
    let size = file.metadata().await.map_err(staging)?.len();
    let transfer = download.transfer;
    drop(download.file); // unlinked; the open file reads on
    let name = query
        .path
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("download");
    let body = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = BytesMut::zeroed(DOWNLOAD_CHUNK);
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(buf.freeze()), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header((SHA256_HEADER, transfer.sha256.unwrap_or_default()))
        .insert_header((TRANSFER_HEADER, transfer.transfer_id))
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"{}\"",
                name.replace(['"', '\\', '\r', '\n'], "_")
            ),
        ))
        .no_chunking(size)
        .streaming(body))
}
