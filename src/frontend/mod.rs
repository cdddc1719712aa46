pub mod vduse;
pub mod vhost_user;
