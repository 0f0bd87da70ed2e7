//! Reconcile flows against a mock API server.
