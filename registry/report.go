package registry

import (
	"context"
	"fmt"
	"strconv"

	"github.com/redis/go-redis/v9"
)

// dropScript marks lost the backends an agent reported lost: the entries
// of PS ARGV[1] for agent ARGV[2] under owner ARGV[3]. ARGV: dead_ps,
// agent, owner, maxlen, then pairs (target, port). A pair is marked only
// when the dead PS's entry for the target still has that port, that agent
// id and that owner (an entry without an owner counts as owner ""), so a
// report can never touch a newer publication on another port, another
// agent's entry, or one published under another credential. Each marking
// is appended to the change feed like every other route write, so readers
// stop using the backend, and destroy the client sockets redirected to it,
// within the feed's latency.
//
// Marked, not removed: a removed backend looks to readers like a
// withdrawal (a drain, whose connections in flight must finish), while a
// lost one is dead like a PS whose lease lapsed, and its clients' sockets,
// which hang on a vanished PS, are destroyed. The entry stays until the
// dead PS's own withdrawal, a peer's collection of it, or a new
// publication by that PS (which clears the mark). The port's psroutes
// record and any quarantine are left as they are. The dead PS's lease is
// not consulted (the point is to act before it lapses) and not guarded by
// its nonce: the writer is another PS acting on the agent's word about its
// own route. It returns the number of backends marked.
var dropScript = redis.NewScript(`
local p, ps, agent, owner, maxlen = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local marked = 0
for i = 5, #ARGV, 2 do
  local target, port = ARGV[i], ARGV[i+1]
  local rkey = p .. ':route:' .. target
  local raw = redis.call('HGET', rkey, ps)
  if raw then
    local ok, e = pcall(cjson.decode, raw)
    if ok and type(e) == 'table' and e.lost ~= true then
      local eo = e.owner
      if type(eo) ~= 'string' then eo = '' end
      if tostring(e.port) == port and e.agent_id == agent and eo == owner then
        e.lost = true
        redis.call('HSET', rkey, ps, cjson.encode(e))
        redis.call('XADD', p .. ':changes', '*', 'k', 'route', 'id', target)
        marked = marked + 1
      end
    end
  end
end
redis.call('XTRIM', p .. ':changes', 'MAXLEN', '~', maxlen)
return marked
`)

// DropBackends marks lost (dead; see Backend.Lost), on an agent's report
// that its tunnel to PS deadPS is lost, that PS's backends for the reported
// (target, port) pairs: only those whose entry still names agentID, owner
// (the credential key of the session that carried the report) and the same
// port. A publication's own AgentID and Owner are ignored; the arguments
// decide. It returns how many backends were marked. Pairs are sent in batches (batchSize), each one
// atomic script call.
func (r *Registry) DropBackends(ctx context.Context, deadPS, agentID, owner string, pubs []Publication) (int, error) {
	if err := validPSID(deadPS); err != nil {
		return 0, err
	}
	if agentID == "" {
		return 0, fmt.Errorf("drop backends of ps %s: agent id is required", deadPS)
	}
	removed := 0
	for start := 0; start < len(pubs); start += batchSize {
		end := min(start+batchSize, len(pubs))
		args := make([]any, 0, 4+2*(end-start))
		args = append(args, deadPS, agentID, owner, r.maxLen)
		for _, p := range pubs[start:end] {
			if !p.Target.IsValid() || p.Port == 0 {
				return removed, fmt.Errorf("drop backends of ps %s: %v: target and port are required", deadPS, p)
			}
			args = append(args, p.Target.String(), strconv.Itoa(int(p.Port)))
		}
		n, err := dropScript.Run(ctx, r.rdb, []string{r.keys.p}, args...).Int()
		if err != nil {
			return removed, fmt.Errorf("drop backends of ps %s for agent %s: %w", deadPS, agentID, err)
		}
		removed += n
	}
	return removed, nil
}
