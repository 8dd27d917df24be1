-- library: append_audit
-- append_audit(stream, line): one audit line (JSON, app.db.audit.line) onto the audit
-- stream, under the field app.store.audit_stream reads (FIELD).
local function append_audit(stream, line)
  redis.call('XADD', stream, '*', 'e', line)
end
