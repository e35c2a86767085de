package registry

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/redis/go-redis/v9"
)

// go-redis prints connection-pool complaints through a process-wide logger
// straight to stderr. Every failure it reports also comes back to us as an
// error, which we log once where we handle it; so its own lines go to slog
// at debug level instead of cluttering an operator's log while Redis is down.
var quietRedisOnce sync.Once

type slogRedisLogger struct{}

func (slogRedisLogger) Printf(ctx context.Context, format string, v ...any) {
	slog.Default().DebugContext(ctx, "go-redis: "+fmt.Sprintf(format, v...))
}

func quietRedis() { quietRedisOnce.Do(func() { redis.SetLogger(slogRedisLogger{}) }) }
