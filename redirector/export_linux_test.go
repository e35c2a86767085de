package redirector

// ForceNetlinkDestroy makes the redirector use the netlink SOCK_DESTROY
// fallback, as on a kernel older than 6.5.
func ForceNetlinkDestroy(c *Config) { c.forceNetlinkDestroy = true }
