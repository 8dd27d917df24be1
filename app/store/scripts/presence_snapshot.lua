-- What a new approval is planned with: the user's account version and connected devices
-- (see the snapshot library), in one round trip.
-- KEYS: presence account_version processes
-- ARGV: process_ttl
-- include: app.store/snapshot
return snapshot(presence, account_version, processes, process_ttl)
