"""The HTTP API: cancellations, seller decisions and the payment provider's webhook over JSON,
for services that should not need a Temporal client. Composition root: `api.app.create_app`."""
