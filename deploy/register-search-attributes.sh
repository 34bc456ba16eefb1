#!/usr/bin/env bash
# Register the search attributes OrderCancellation uses on a Temporal cluster (once per
# namespace). `ordercancel dev` and the tests register them on their own servers.
# Usage: TEMPORAL_ADDRESS=host:7233 TEMPORAL_NAMESPACE=prod deploy/register-search-attributes.sh
set -euo pipefail
address=${TEMPORAL_ADDRESS:-127.0.0.1:7233}
namespace=${TEMPORAL_NAMESPACE:-default}
while read -r name type; do
  temporal operator search-attribute create --address "$address" --namespace "$namespace" \
    --name "$name" --type "$type"
done <<'LIST'
OrderId Keyword
SellerId Keyword
BuyerId Keyword
CancellationStatus Keyword
RefundStage Int
CouponOutcome Keyword
SellerDeadline Datetime
LIST
