pub mod vhost_user;
