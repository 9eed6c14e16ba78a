"""The outbound queue: durable storage, next hops, delivery, DSNs."""
