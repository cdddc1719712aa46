pub mod vhost_user;
pub mod vduse;
