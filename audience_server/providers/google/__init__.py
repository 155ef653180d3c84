"""``google``: Google Customer Match through the Data Manager API.

provider.py     the calls, their order, Google's errors, the options
identifiers.py  pure: a user -> an AudienceMember, normalized as Google's formatter does
credentials.py  the access token: static, or refreshed by google-auth from a credentials JSON
outcomes.py     pure: what requestStatus:retrieve says about an ingest

Credentials (exactly one): ``access_token`` (OAuth 2, scope
``https://www.googleapis.com/auth/datamanager``; used as given, so it stops working when it
expires, about an hour after it was minted: fine for a trial, not for a server), or
``credentials_file = "/path/to/google.json"`` (a relative path is read from the server's
working directory): an ``authorized_user`` JSON (``client_id``, ``client_secret``,
``refresh_token``, optional ``token_uri``; what ``gcloud auth application-default login``
writes) or a ``service_account`` key JSON. The server then mints
its own tokens with google-auth, refreshes each five minutes before it expires and once more
when Google answers UNAUTHENTICATED (then the call is retried); a refresh that Google refuses
(``invalid_grant``: a revoked refresh token, a deleted key) fails the delivery naming the
destination. A missing or unreadable file, one that is not JSON or not of those two types,
or both options at once, stop the server at start with one line naming the option.

Options: ``account_id`` (the operating account; ``123-456-7890`` is read as digits) is
required; ``account_type`` (default ``GOOGLE_ADS``; also ``DISPLAY_VIDEO_PARTNER``,
``DISPLAY_VIDEO_ADVERTISER``, ``DATA_PARTNER``); ``login_account_id`` /
``login_account_type`` (a manager account) and ``linked_account_id`` /
``linked_account_type``; ``user_list_id``, ``user_lists``, ``membership_days`` (1-540);
``consent``; ``chunk_size``; ``timeout`` seconds (default 30); ``status_wait`` seconds
(default 60; 0: do not read outcomes) and ``status_poll`` seconds (default 2); ``base_url``.

Which list: ``user_lists`` maps a segment name at the destination (prefix applied, e.g.
``{ "blotout_VIP" = "5551234" }``) to a list id, and ``user_list_id`` is the list for every
other name (then a ``primary`` of any segment replaces that one shared list). Without
either, the list is the one whose display name is the segment name in the operating
account, created (``CONTACT_ID`` upload keys, ``membership_days`` when set) when there is
none; the userLists calls carry the login/linked account as ``login-account`` /
``linked-account`` headers. Found ids are remembered per segment name; a remembered list
that Google no longer knows is forgotten and the attempt retried.

Batching and order: at most 10,000 audience members per ingest (``chunk_size``, default and
maximum 10,000), at most 10 identifiers per member (this adapter sends at most 3).
``custom`` ingests (adds). ``primary`` ingests the whole segment first, then calls
``audienceMembers:removeAll`` with ``removeAsOfTime`` = the attempt's start: Google removes
the members last added before it, so the members of this segment stay, the others go, and
the list is never empty while Google processes the ingests (which can take hours). Nothing
is kept between deliveries but the list id (in memory). A failed attempt starts over; its
members are added again by the next one, whose start is later.

Outcomes: ingest answers only a ``requestId``; after the last chunk the attempt polls
``requestStatus:retrieve`` for each of its requests (``status_poll`` doubled up to 15 s,
``status_wait`` in all). Records Google refused in a SUCCESS or PARTIAL_SUCCESS are added to
the delivery's ``invalidUsers``; a FAILED request fails the delivery with Google's reasons
(and a ``primary`` then removes nothing); one still PROCESSING at the bound is logged with
its id and not waited for. The wait counts in the last chunk's ``AUDIENCE_CHUNK_TIMEOUT``.

What is sent per user: see ``identifiers`` (SHA-256, lowercase hex, ``encoding: HEX``; a
value that already is a SHA-256 hex digest passes through). A user with none of email,
phone or a whole address is invalid (counted, not sent). ``externalId`` is not sent: it
matches only USER_ID lists, not contact-info ones.

Consent, where the sources differ: ``consent`` (``adUserData``, ``adPersonalization``:
``CONSENT_GRANTED`` / ``CONSENT_DENIED`` / ``CONSENT_STATUS_UNSPECIFIED``) is sent as
request-level consent only when configured, as today: the server does not claim consent it
was not told about. The Data Manager protos make it OPTIONAL (``ingestion_service.proto``:
"Request-level consent to apply to all users"; user-level overrides it), while
``processing_errors.proto`` lists ``PROCESSING_ERROR_REASON_UNKNOWN_CONSENT`` ("could not be
determined" from row, request and account settings) and ``..._NO_CONSENT``: records of users
whose consent Google cannot determine (EEA users, say) are refused, and now show up in
``invalidUsers``. Set ``consent`` when the advertiser has it. Every ingest states
``termsOfService.customerMatchTermsOfServiceStatus = ACCEPTED``, which Google requires for
Customer Match: configuring this destination is accepting those terms.

Errors come as google.rpc status JSON ``{"error": {"code", "message", "status",
"details"}}``; its ``status`` decides. RESOURCE_EXHAUSTED (429), UNAVAILABLE, INTERNAL,
ABORTED, DEADLINE_EXCEEDED and UNKNOWN are retried, as are 408/429/5xx answers without
that JSON, timeouts and connection errors (``Retry-After``, else ``RetryInfo.retryDelay``,
honoured). Every other status (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED after
the one refresh, NOT_FOUND, ...) fails the delivery at once, with Google's message, its
ErrorInfo reasons and first field violation, e.g. ``Google Data Manager 403
PERMISSION_DENIED: The caller does not have permission [PERMISSION_DENIED]``.
"""

from __future__ import annotations

from .identifiers import audience_member, audience_members, email, name, postal_code
from .provider import GoogleProvider, platform_error

__all__ = [
    "GoogleProvider",
    "audience_member",
    "audience_members",
    "email",
    "name",
    "platform_error",
    "postal_code",
]
