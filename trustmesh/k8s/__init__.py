"""Kubernetes integration: the sidecar-injecting admission webhook and the CR reconciler.

* `webhook_config` and `webhook` are pure: a flat string mapping (a ConfigMap) becomes a
  frozen `WebhookConfig`, and `mutate(review, config)` turns an `AdmissionReview` into
  its answer. `webhook_server` is the thin HTTPS shell around them.
* `reconciler` is pure: custom resources and watch events in, `Plan`s out.
  `reconcile_loop` drives it with the official `kubernetes` client (the `k8s` extra)
  and writes to the registry through `trustmesh.operator_client.OperatorClient`.
* `certs` makes the webhook's serving certificate when cert-manager is not used.
* `cli` holds the `trustmesh webhook ...` and `trustmesh reconcile` commands.

Nothing here imports `kubernetes` at module level, so the package imports without the
extra installed; only `reconcile_loop.KubeCustomResources` needs it.
"""
