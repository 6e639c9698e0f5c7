//! The bodies of the client stack: [`MeshBody`] for requests (streamed, or
//! kept for retries) and [`ResponseBody`] for responses (streamed, with the
//! bookkeeping that ends with the response).

mod request;
mod response;

pub use self::request::{DEFAULT_RETRY_BUFFER_LIMIT, MeshBody};
pub(crate) use self::request::{Kept, Prepared, Preparing};
pub(crate) use self::response::BodyTimeout;
pub use self::response::ResponseBody;
