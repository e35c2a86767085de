package k8s_test

import (
	"fmt"
	"net"
	"net/url"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// roleFlags maps a tether subcommand (ps, agent, ...) to the flags its
// --help lists, each with the type word of its value ("string", "duration",
// "int", "float", "strings"; "" for a bool flag, which takes none).
type roleFlags map[string]map[string]string

// helpFlagLine matches a flag line of cobra's help: "  -c, --config string  ..."
// or "      --insecure   ..." (a bool: no type word).
var helpFlagLine = regexp.MustCompile(`^\s+(?:-\w, )?--([a-z0-9][a-z0-9-]*)(?: ([a-zA-Z]+))?(?:\s{2,}|$)`)

// parseHelpFlags reads the flags of one --help output.
func parseHelpFlags(help string) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(help, "\n") {
		if m := helpFlagLine.FindStringSubmatch(line); m != nil {
			out[m[1]] = m[2]
		}
	}
	return out
}

// linuxCapabilities are the capability names Kubernetes passes to the
// runtime (without the CAP_ prefix), through CAP_CHECKPOINT_RESTORE (Linux 5.9).
var linuxCapabilities = map[string]bool{}

func init() {
	for _, c := range strings.Fields(`CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID
		SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER
		SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE
		SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN
		SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE`) {
		linuxCapabilities[c] = true
	}
}

// envRef matches the $(VAR) references Kubernetes expands in args.
var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// checker collects the problems of one kustomize build.
type checker struct {
	build   string
	objs    []object
	flags   roleFlags
	secrets string // deploy/k8s/README.md: how the Secrets are made
	errs    []error
}

func (c *checker) errorf(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf(c.build+": "+format, args...))
}

// podTemplate is one workload's pod template with its identity.
type podTemplate struct {
	kind, name string
	selector   map[string]string
	spec       *corev1.PodTemplateSpec
}

func (c *checker) workloads() []podTemplate {
	var out []podTemplate
	for _, o := range c.objs {
		switch w := o.obj.(type) {
		case *appsv1.DaemonSet:
			out = append(out, podTemplate{"DaemonSet", w.Name, w.Spec.Selector.MatchLabels, &w.Spec.Template})
		case *appsv1.StatefulSet:
			out = append(out, podTemplate{"StatefulSet", w.Name, w.Spec.Selector.MatchLabels, &w.Spec.Template})
		case *appsv1.Deployment:
			out = append(out, podTemplate{"Deployment", w.Name, w.Spec.Selector.MatchLabels, &w.Spec.Template})
		}
	}
	return out
}

func (c *checker) configMap(name string) *corev1.ConfigMap {
	for _, o := range c.objs {
		if cm, ok := o.obj.(*corev1.ConfigMap); ok && cm.Name == name {
			return cm
		}
	}
	return nil
}

// invocation is what one container runs: the role, its effective flag
// values (config file, then environment, then args, as the binary layers
// them) and where each came from.
type invocation struct {
	role   string
	values map[string]string
	origin map[string]string
}

// check runs every consistency rule over the build and returns the problems.
func (c *checker) check() []error {
	images := map[string]bool{}
	for _, w := range c.workloads() {
		c.checkWorkload(w, images)
	}
	if len(images) != 1 {
		c.errorf("containers use %d images %v, want one tether image everywhere", len(images), keys(images))
	}
	c.checkServices()
	return c.errs
}

func (c *checker) checkWorkload(w podTemplate, images map[string]bool) {
	where := w.kind + "/" + w.name
	spec := &w.spec.Spec
	if !labels.SelectorFromSet(w.selector).Matches(labels.Set(w.spec.Labels)) {
		c.errorf("%s: selector %v does not select its own pod template (labels %v)", where, w.selector, w.spec.Labels)
	}
	volumes := map[string]*corev1.Volume{}
	for i := range spec.Volumes {
		volumes[spec.Volumes[i].Name] = &spec.Volumes[i]
	}
	if len(spec.InitContainers) > 0 {
		c.errorf("%s: init containers are not checked by this test; add the checks before using them", where)
	}
	for i := range spec.Containers {
		ctr := &spec.Containers[i]
		cwhere := where + " container " + ctr.Name
		images[ctr.Image] = true
		c.checkSecurity(cwhere, ctr)
		c.checkMounts(cwhere, ctr, volumes)
		inv := c.invocation(cwhere, ctr, volumes)
		if inv == nil {
			continue
		}
		c.checkProbes(cwhere, ctr, inv)
		c.checkFilesMounted(cwhere, ctr, volumes, inv)
		c.checkRole(cwhere, spec, ctr, volumes, inv)
		c.checkDNS(cwhere, spec, inv)
	}
}

// invocation reads a container's args, env and --config file and checks
// each flag, env variable and config key against the binary's --help.
func (c *checker) invocation(where string, ctr *corev1.Container, volumes map[string]*corev1.Volume) *invocation {
	if len(ctr.Command) > 0 {
		c.errorf("%s: command %v overrides the image's entrypoint (tether); give the role in args", where, ctr.Command)
	}
	if len(ctr.Args) == 0 {
		c.errorf("%s: no args: the first must be the role (ps, agent, redirector, proxy)", where)
		return nil
	}
	role := ctr.Args[0]
	flags, ok := c.flags[role]
	if !ok {
		c.errorf("%s: args start with %q, which is not a tether daemon (%v)", where, role, keys(c.flags))
		return nil
	}
	inv := &invocation{role: role, values: map[string]string{}, origin: map[string]string{}}
	envNames := map[string]*corev1.EnvVar{}
	for i := range ctr.Env {
		envNames[ctr.Env[i].Name] = &ctr.Env[i]
	}
	if len(ctr.EnvFrom) > 0 {
		c.errorf("%s: envFrom hides which TETHER_* variables are set; list them in env", where)
	}

	argValues := map[string]string{}
	args := ctr.Args[1:]
	for i := 0; i < len(args); i++ {
		a := args[i]
		for _, m := range envRef.FindAllStringSubmatch(a, -1) {
			if envNames[m[1]] == nil {
				c.errorf("%s: arg %q refers to $(%s), which the container's env does not define (Kubernetes would pass it literally)", where, a, m[1])
			}
		}
		if !strings.HasPrefix(a, "--") {
			c.errorf("%s: arg %q is not a flag (tether %s takes no positional arguments)", where, a, role)
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		typ, known := flags[name]
		takesValue := typ != ""
		if !known {
			c.errorf("%s: flag --%s is not a flag of \"tether %s\"%s", where, name, role, suggest(name, flags))
			continue
		}
		if takesValue && !hasValue {
			if i+1 >= len(args) {
				c.errorf("%s: flag --%s needs a value", where, name)
				continue
			}
			i++
			value = args[i]
		}
		argValues[name] = value
	}

	// The config file, read from the ConfigMap that backs its mount.
	if cfgPath, ok := argValues["config"]; ok {
		cfg := c.fileFromConfigMap(where, ctr, volumes, cfgPath)
		if cfg != nil {
			var keysInFile map[string]any
			if err := yaml.UnmarshalStrict(cfg, &keysInFile); err != nil {
				c.errorf("%s: config %s is not a YAML mapping: %v", where, cfgPath, err)
			}
			for k, v := range keysInFile {
				if _, known := flags[k]; !known || k == "config" {
					c.errorf("%s: config %s has key %q, which is not a flag of \"tether %s\"%s", where, cfgPath, k, role, suggest(k, flags))
					continue
				}
				inv.values[k] = scalar(v)
				inv.origin[k] = "config " + cfgPath
				if err := checkValueType(flags[k], v); err != nil {
					c.errorf("%s: config %s: key %q: %v", where, cfgPath, k, err)
				}
			}
		}
	}
	for name, ev := range envNames {
		if !strings.HasPrefix(name, "TETHER_") {
			continue
		}
		flag := strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(name, "TETHER_")), "_", "-")
		if name == "TETHER_TOKEN" {
			if role != "agent" && role != "ps" {
				c.errorf("%s: TETHER_TOKEN is read by ps and agent only, not %s", where, role)
			}
			if ev.ValueFrom == nil || ev.ValueFrom.SecretKeyRef == nil {
				c.errorf("%s: TETHER_TOKEN must come from a Secret (secretKeyRef), never a literal", where)
			} else {
				c.checkSecretDocumented(where, ev.ValueFrom.SecretKeyRef.Name, ev.ValueFrom.SecretKeyRef.Key)
			}
			continue
		}
		if _, known := flags[flag]; !known {
			c.errorf("%s: env %s stands for --%s, which is not a flag of \"tether %s\"%s", where, name, flag, role, suggest(flag, flags))
			continue
		}
		inv.values[flag] = ev.Value
		inv.origin[flag] = "env " + name
	}
	for k, v := range argValues {
		inv.values[k] = v
		inv.origin[k] = "arg --" + k
	}
	return inv
}

// fileFromConfigMap returns the content of file p as the container sees it,
// when p lies in a ConfigMap volume; it reports a path outside every mount,
// and a key the ConfigMap lacks.
func (c *checker) fileFromConfigMap(where string, ctr *corev1.Container, volumes map[string]*corev1.Volume, p string) []byte {
	m, rel := mountFor(ctr, p)
	if m == nil {
		c.errorf("%s: %s is not under any volumeMount", where, p)
		return nil
	}
	v := volumes[m.Name]
	if v == nil || v.ConfigMap == nil {
		c.errorf("%s: %s is in volume %q, which is not a ConfigMap volume", where, p, m.Name)
		return nil
	}
	cm := c.configMap(v.ConfigMap.Name)
	if cm == nil {
		c.errorf("%s: volume %q names ConfigMap %q, which the build does not contain", where, m.Name, v.ConfigMap.Name)
		return nil
	}
	data, ok := cm.Data[rel]
	if !ok {
		c.errorf("%s: %s: ConfigMap %q has no key %q (keys %v)", where, p, cm.Name, rel, keys(cm.Data))
		return nil
	}
	return []byte(data)
}

// mountFor returns the volumeMount that holds path p and p relative to it.
func mountFor(ctr *corev1.Container, p string) (*corev1.VolumeMount, string) {
	var best *corev1.VolumeMount
	for i := range ctr.VolumeMounts {
		m := &ctr.VolumeMounts[i]
		if strings.HasPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/") && (best == nil || len(m.MountPath) > len(best.MountPath)) {
			best = m
		}
	}
	if best == nil {
		return nil, ""
	}
	return best, strings.TrimPrefix(p, strings.TrimSuffix(best.MountPath, "/")+"/")
}

func (c *checker) checkMounts(where string, ctr *corev1.Container, volumes map[string]*corev1.Volume) {
	for i, m := range ctr.VolumeMounts {
		if volumes[m.Name] == nil {
			c.errorf("%s: volumeMount %q (%s) names no volume of the pod", where, m.Name, m.MountPath)
		}
		if m.SubPath != "" {
			c.errorf("%s: volumeMount %q uses subPath, which never sees ConfigMap or Secret updates", where, m.Name)
		}
		// A mount inside another (read-only) mount makes the runtime create
		// its mount point in a read-only volume, which fails at pod start.
		for j, o := range ctr.VolumeMounts {
			if i != j && strings.HasPrefix(m.MountPath, strings.TrimSuffix(o.MountPath, "/")+"/") {
				c.errorf("%s: volumeMount %s is nested inside %s", where, m.MountPath, o.MountPath)
			}
		}
	}
}

// checkFilesMounted checks that every file a flag names (tokens, TLS
// material, the pin directory aside) lies in a mounted volume; a Secret's key
// must be one deploy/k8s/README.md tells the operator to create.
func (c *checker) checkFilesMounted(where string, ctr *corev1.Container, volumes map[string]*corev1.Volume, inv *invocation) {
	for flag, value := range inv.values {
		if !(strings.HasSuffix(flag, "-file") || strings.HasPrefix(flag, "tls-") && flag != "tls-server-name") || value == "" {
			continue
		}
		m, rel := mountFor(ctr, value)
		if m == nil {
			c.errorf("%s: --%s %s (from %s) is not in any mounted volume", where, flag, value, inv.origin[flag])
			continue
		}
		v := volumes[m.Name]
		switch {
		case v == nil:
			// reported by checkMounts
		case v.Secret != nil:
			c.checkSecretDocumented(where, v.Secret.SecretName, rel)
		case v.ConfigMap != nil:
			c.fileFromConfigMap(where, ctr, volumes, value)
		default:
			c.errorf("%s: --%s %s is in volume %q, neither a Secret nor a ConfigMap", where, flag, value, m.Name)
		}
	}
}

// checkSecretDocumented: Secrets are never committed, so the README must say
// how to create each one the manifests read, with the key they read.
func (c *checker) checkSecretDocumented(where, name, key string) {
	re := regexp.MustCompile(`kubectl -n tether create secret \w+ ` + regexp.QuoteMeta(name) + `\b[^\n]*--from-file=` + regexp.QuoteMeta(key) + `=`)
	if !re.MatchString(c.secrets) {
		c.errorf("%s: reads key %q of Secret %q, but deploy/k8s/README.md has no \"kubectl -n tether create secret ... %s ... --from-file=%s=...\"", where, key, name, name, key)
	}
}

func (c *checker) checkSecurity(where string, ctr *corev1.Container) {
	sc := ctr.SecurityContext
	if sc == nil {
		c.errorf("%s: no securityContext: say which capabilities it drops and adds", where)
		return
	}
	if sc.Privileged != nil && *sc.Privileged {
		c.errorf("%s: privileged: name the capabilities it needs instead", where)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		c.errorf("%s: allowPrivilegeEscalation must be false", where)
	}
	if sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		c.errorf("%s: capabilities must drop [ALL] and add back what it needs", where)
	}
	if sc.Capabilities != nil {
		for _, cp := range sc.Capabilities.Add {
			name := strings.TrimPrefix(string(cp), "CAP_")
			if !linuxCapabilities[name] {
				c.errorf("%s: capability %q is not a Linux capability", where, cp)
			}
		}
	}
}

// checkProbes: readiness on /readyz and liveness on /healthz, both on the
// port of the effective --metrics, which must be reachable by the kubelet.
func (c *checker) checkProbes(where string, ctr *corev1.Container, inv *invocation) {
	metrics := inv.values["metrics"]
	if metrics == "" {
		c.errorf("%s: no --metrics: /readyz and /healthz would not be served", where)
		return
	}
	host, port, err := net.SplitHostPort(metrics)
	if err != nil {
		c.errorf("%s: --metrics %q (from %s) is not HOST:PORT: %v", where, metrics, inv.origin["metrics"], err)
		return
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() || host == "localhost" {
		c.errorf("%s: --metrics %s listens on loopback, where the kubelet's probes cannot reach it", where, metrics)
	}
	for _, p := range []struct {
		kind, path string
		probe      *corev1.Probe
	}{{"readinessProbe", "/readyz", ctr.ReadinessProbe}, {"livenessProbe", "/healthz", ctr.LivenessProbe}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			c.errorf("%s: no %s httpGet %s", where, p.kind, p.path)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			c.errorf("%s: %s path %q, want %q", where, p.kind, p.probe.HTTPGet.Path, p.path)
		}
		got, err := resolvePort(ctr, p.probe.HTTPGet.Port)
		if err != nil {
			c.errorf("%s: %s: %v", where, p.kind, err)
		} else if strconv.Itoa(got) != port {
			c.errorf("%s: %s probes port %d but --metrics (from %s) listens on %s", where, p.kind, got, inv.origin["metrics"], port)
		}
	}
}

// resolvePort turns a probe or Service port (a number or a container
// port's name) into a number.
func resolvePort(ctr *corev1.Container, p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range ctr.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("port %q is not a named port of container %s", p.StrVal, ctr.Name)
}

// fieldRefOf returns the downward-API field a $(VAR) value comes from.
func fieldRefOf(ctr *corev1.Container, value string) string {
	m := envRef.FindStringSubmatch(value)
	if m == nil || m[0] != value {
		return ""
	}
	for _, e := range ctr.Env {
		if e.Name == m[1] && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			return e.ValueFrom.FieldRef.FieldPath
		}
	}
	return ""
}

// checkRole holds the rules particular to each daemon.
func (c *checker) checkRole(where string, spec *corev1.PodSpec, ctr *corev1.Container, volumes map[string]*corev1.Volume, inv *invocation) {
	grace := int64(30)
	if spec.TerminationGracePeriodSeconds != nil {
		grace = *spec.TerminationGracePeriodSeconds
	}
	if d, ok := inv.values["drain-timeout"]; ok {
		if dur, err := parseDuration(d); err != nil {
			c.errorf("%s: --drain-timeout %q: %v", where, d, err)
		} else if dur >= grace {
			c.errorf("%s: terminationGracePeriodSeconds %d does not exceed --drain-timeout %s: the kubelet kills the drain", where, grace, d)
		}
	}
	c.checkSandbox(where, spec, ctr, inv)
	switch inv.role {
	case "ps":
		if f := fieldRefOf(ctr, inv.values["id"]); f != "metadata.name" {
			c.errorf("%s: --id %q should be the pod name from the downward API (stable in a StatefulSet), got field %q", where, inv.values["id"], f)
		}
		if f := fieldRefOf(ctr, inv.values["advertise"]); f != "status.podIP" {
			c.errorf("%s: --advertise %q should be the pod IP from the downward API, got field %q", where, inv.values["advertise"], f)
		}
		if inv.values["token-file"] == "" && inv.values["tls-ca"] == "" {
			c.errorf("%s: the PS has no agent credentials (--token-file or --tls-ca) and would refuse to start", where)
		}
		if inv.values["insecure"] == "true" {
			c.errorf("%s: --insecure in a deployment manifest", where)
		}
		listen := inv.values["listen"]
		if listen == "" {
			listen = ":7000"
		}
		if _, port, err := net.SplitHostPort(listen); err != nil {
			c.errorf("%s: --listen %q: %v", where, listen, err)
		} else if !hasContainerPort(ctr, "tunnel", port) {
			c.errorf("%s: no container port named tunnel equal to --listen's port %s", where, port)
		}
	case "agent":
		if !spec.HostNetwork {
			c.errorf("%s: the agent needs hostNetwork: it dials the node's services and registers the node's IP", where)
		}
		if f := fieldRefOf(ctr, inv.values["ip"]); f != "status.hostIP" {
			c.errorf("%s: --ip %q should be the node IP from the downward API (status.hostIP), got field %q", where, inv.values["ip"], f)
		}
		if inv.values["expose"] == "" {
			c.errorf("%s: the agent exposes nothing (--expose)", where)
		}
		c.checkServer(where, inv.values["server"])
	case "redirector":
		if !spec.HostNetwork {
			c.errorf("%s: the redirector runs with hostNetwork", where)
		}
		bpffs := hostPathMount(ctr, volumes, "/sys/fs/bpf")
		if bpffs == nil {
			c.errorf("%s: no hostPath mount of the node's bpffs (/sys/fs/bpf): pins would die with the pod", where)
		} else if pin := inv.values["pin-dir"]; pin != "" && !strings.HasPrefix(pin, strings.TrimSuffix(bpffs.MountPath, "/")+"/") {
			c.errorf("%s: --pin-dir %s is not under the bpffs mount %s", where, pin, bpffs.MountPath)
		}
		cgroup := inv.values["cgroup"]
		if cgroup == "" {
			c.errorf("%s: no --cgroup: the redirector refuses to start without one", where)
			break
		}
		if m := hostPathMount(ctr, volumes, "/sys/fs/cgroup"); m != nil && path.Clean(cgroup) == path.Clean(m.MountPath) {
			c.errorf("%s: --cgroup %s is the root of the cgroup2 mount: every process of the node would be redirected", where, cgroup)
			break
		}
		m, _ := mountFor(ctr, cgroup)
		if m == nil || volumes[m.Name] == nil || volumes[m.Name].HostPath == nil || !strings.HasPrefix(volumes[m.Name].HostPath.Path, "/sys/fs/cgroup") {
			c.errorf("%s: --cgroup %s is not inside a hostPath mount of the node's cgroup2 file system", where, cgroup)
		}
		if sc := ctr.SecurityContext; sc != nil && sc.Capabilities != nil {
			have := map[string]bool{}
			for _, cp := range sc.Capabilities.Add {
				have[strings.TrimPrefix(string(cp), "CAP_")] = true
			}
			for _, need := range []string{"BPF", "NET_ADMIN", "PERFMON"} {
				if !have[need] {
					c.errorf("%s: the redirector needs CAP_%s (see deploy/systemd/tether-redirector.service)", where, need)
				}
			}
			if have["SYS_ADMIN"] {
				c.errorf("%s: CAP_SYS_ADMIN is not needed by the redirector (it only mounts bpffs, which the node has)", where)
			}
		}
	}
}

// checkSandbox: the agent and the proxy, and a PS with the listeners data
// plane, run as a user other than root with the runtime's default seccomp
// profile and no capability. The redirector, and a PS whose data plane is
// sk_lookup (or auto, which tries it), load BPF: they run as uid 0 (the
// redirector owns its pins; Kubernetes gives a non-root container no
// ambient capabilities, so added ones would never reach tether) under a
// profile that allows bpf(2), which the runtimes' default profiles refuse
// without CAP_SYS_ADMIN (test/container shows it).
func (c *checker) checkSandbox(where string, spec *corev1.PodSpec, ctr *corev1.Container, inv *invocation) {
	role := inv.role
	seccomp := corev1.SeccompProfileType("")
	nonRoot := false
	var uid *int64
	if psc := spec.SecurityContext; psc != nil {
		if psc.SeccompProfile != nil {
			seccomp = psc.SeccompProfile.Type
		}
		nonRoot = psc.RunAsNonRoot != nil && *psc.RunAsNonRoot
		uid = psc.RunAsUser
	}
	var added []string
	if sc := ctr.SecurityContext; sc != nil {
		if sc.SeccompProfile != nil {
			seccomp = sc.SeccompProfile.Type
		}
		if sc.RunAsNonRoot != nil {
			nonRoot = *sc.RunAsNonRoot
		}
		if sc.RunAsUser != nil {
			uid = sc.RunAsUser
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			c.errorf("%s: readOnlyRootFilesystem must be true (tether writes nothing to its image)", where)
		}
		if sc.Capabilities != nil {
			for _, cp := range sc.Capabilities.Add {
				added = append(added, strings.TrimPrefix(string(cp), "CAP_"))
			}
		}
	}
	loadsBPF := role == "redirector"
	if role == "ps" {
		plane := inv.values["data-plane"]
		if plane == "" {
			plane = "auto" // the binary's default
		}
		loadsBPF = plane != "listeners"
		if loadsBPF {
			c.checkPSCapabilities(where, plane, added, nonRoot, uid)
		}
	}
	if loadsBPF {
		if seccomp == corev1.SeccompProfileTypeRuntimeDefault || seccomp == "" {
			c.errorf("%s: seccomp %q refuses bpf(2) without CAP_SYS_ADMIN: the %s needs Unconfined or a Localhost profile that allows bpf", where, seccomp, role)
		}
		return
	}
	if seccomp != corev1.SeccompProfileTypeRuntimeDefault {
		c.errorf("%s: seccomp %q, want RuntimeDefault for %s", where, seccomp, role)
	}
	if !nonRoot {
		c.errorf("%s: %s needs no root: set runAsNonRoot", where, role)
	}
	if len(added) > 0 {
		c.errorf("%s: %s needs no capability, adds %v", where, role, added)
	}
}

// checkPSCapabilities: a PS that loads the sk_lookup data plane (plane
// sk_lookup or auto) is given exactly CAP_BPF and CAP_NET_ADMIN, as the
// systemd unit is (deploy/capabilities_linux_test.go measures the set), and
// runs as uid 0 so that it has them: Kubernetes sets no ambient
// capabilities, so a non-root container's added capabilities are dropped at
// exec, and auto would quietly fall back to listeners.
func (c *checker) checkPSCapabilities(where, plane string, added []string, nonRoot bool, uid *int64) {
	have := map[string]bool{}
	for _, cp := range added {
		have[cp] = true
	}
	for _, need := range []string{"BPF", "NET_ADMIN"} {
		if !have[need] {
			c.errorf("%s: the sk_lookup data plane (--data-plane %s) needs CAP_%s (see deploy/systemd/tether-ps.service); add it, or use --data-plane listeners", where, plane, need)
		}
	}
	for _, cp := range added {
		if cp != "BPF" && cp != "NET_ADMIN" {
			c.errorf("%s: the PS needs CAP_BPF and CAP_NET_ADMIN only, adds %s", where, cp)
		}
	}
	if nonRoot || uid == nil || *uid != 0 {
		c.errorf("%s: the PS adds capabilities for sk_lookup but does not run as uid 0 (runAsUser 0, runAsNonRoot false): Kubernetes gives a non-root container no ambient capabilities, so tether would never hold them", where)
	}
}

func hasContainerPort(ctr *corev1.Container, name, port string) bool {
	for _, p := range ctr.Ports {
		if p.Name == name && strconv.Itoa(int(p.ContainerPort)) == port {
			return true
		}
	}
	return false
}

func hostPathMount(ctr *corev1.Container, volumes map[string]*corev1.Volume, hostPath string) *corev1.VolumeMount {
	for i, m := range ctr.VolumeMounts {
		if v := volumes[m.Name]; v != nil && v.HostPath != nil && path.Clean(v.HostPath.Path) == hostPath {
			return &ctr.VolumeMounts[i]
		}
	}
	return nil
}

// clusterDNS matches the in-cluster Service names the manifests may dial.
var clusterDNS = regexp.MustCompile(`\b([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?\b`)

// checkDNS: a hostNetwork pod resolves with the node's resolver unless its
// dnsPolicy is ClusterFirstWithHostNet, and the node's resolver does not
// know Service names.
func (c *checker) checkDNS(where string, spec *corev1.PodSpec, inv *invocation) {
	for flag, v := range inv.values {
		if clusterDNS.MatchString(v) && spec.HostNetwork && spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
			c.errorf("%s: --%s %s is a Service name, but a hostNetwork pod resolves it only with dnsPolicy ClusterFirstWithHostNet", where, flag, v)
		}
		if flag == "redis" {
			if _, err := url.Parse(v); err != nil || !strings.HasPrefix(v, "redis://") && !strings.HasPrefix(v, "rediss://") {
				c.errorf("%s: --redis %q is not a redis:// URL", where, v)
			}
		}
	}
}

// checkServer: the agent's --server must be the tunnel Service of the build
// (name.namespace.svc), on a port whose target is the PS's tunnel port.
func (c *checker) checkServer(where, servers string) {
	if servers == "" {
		c.errorf("%s: the agent has no --server", where)
		return
	}
	for _, s := range strings.Split(strings.Trim(servers, "[]"), ",") {
		s = strings.TrimSpace(s)
		host, port, err := net.SplitHostPort(s)
		if err != nil {
			c.errorf("%s: --server %q is not HOST:PORT: %v", where, s, err)
			continue
		}
		m := clusterDNS.FindStringSubmatch(host)
		if m == nil {
			continue // an address outside the cluster: nothing to compare
		}
		svc := c.service(m[1], m[2])
		if svc == nil {
			c.errorf("%s: --server %s names Service %s/%s, which the build does not contain", where, s, m[2], m[1])
			continue
		}
		found := false
		for _, sp := range svc.Spec.Ports {
			if strconv.Itoa(int(sp.Port)) == port {
				found = true
			}
		}
		if !found {
			c.errorf("%s: --server %s: Service %s has no port %s", where, s, svc.Name, port)
		}
		if svc.Spec.ClusterIP == corev1.ClusterIPNone {
			c.errorf("%s: --server %s is a headless Service: agents need the VIP", where, s)
		}
	}
}

func (c *checker) service(name, namespace string) *corev1.Service {
	for _, o := range c.objs {
		if s, ok := o.obj.(*corev1.Service); ok && s.Name == name && s.Namespace == namespace {
			return s
		}
	}
	return nil
}

// checkServices: every Service selects a workload of the build, in its
// namespace, and every target port is a port of that workload's container.
func (c *checker) checkServices() {
	for _, o := range c.objs {
		svc, ok := o.obj.(*corev1.Service)
		if !ok {
			continue
		}
		var selected *podTemplate
		for _, w := range c.workloads() {
			if len(svc.Spec.Selector) > 0 && labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(w.spec.Labels)) {
				selected = &w
			}
		}
		if selected == nil {
			c.errorf("Service %s selects no workload of the build (selector %v)", svc.Name, svc.Spec.Selector)
			continue
		}
		for _, sp := range svc.Spec.Ports {
			tp := sp.TargetPort
			if tp.Type == intstr.Int && tp.IntVal == 0 {
				tp = intstr.FromInt32(sp.Port)
			}
			ok := false
			for i := range selected.spec.Spec.Containers {
				if n, err := resolvePort(&selected.spec.Spec.Containers[i], tp); err == nil {
					for _, cp := range selected.spec.Spec.Containers[i].Ports {
						if int(cp.ContainerPort) == n {
							ok = true
						}
					}
				}
			}
			if !ok {
				c.errorf("Service %s port %d targets %s, which no container of %s/%s declares", svc.Name, sp.Port, tp.String(), selected.kind, selected.name)
			}
		}
	}
}

// parseDuration reads a Go duration as whole seconds.
func parseDuration(s string) (int64, error) {
	var total float64
	rest := s
	units := map[string]float64{"h": 3600, "m": 60, "s": 1, "ms": 0.001}
	re := regexp.MustCompile(`^([0-9.]+)(ms|h|m|s)`)
	for rest != "" {
		m := re.FindStringSubmatch(rest)
		if m == nil {
			return 0, fmt.Errorf("not a duration")
		}
		f, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			return 0, err
		}
		total += f * units[m[2]]
		rest = rest[len(m[0]):]
	}
	return int64(total + 0.999), nil
}

// scalar renders a config value the way the flag would read it; a list
// becomes its comma-joined items.
func scalar(v any) string {
	switch x := v.(type) {
	case []any:
		parts := make([]string, len(x))
		for i, e := range x {
			parts[i] = fmt.Sprint(e)
		}
		return strings.Join(parts, ",")
	default:
		return fmt.Sprint(x)
	}
}

// checkValueType checks that a config value reads as the flag's type, as
// the binary would parse it.
func checkValueType(typ string, v any) error {
	str := fmt.Sprint(v)
	switch typ {
	case "":
		if _, ok := v.(bool); !ok {
			return fmt.Errorf("%q is not a bool", str)
		}
	case "duration":
		if _, err := time.ParseDuration(str); err != nil {
			return fmt.Errorf("%q is not a duration: %v", str, err)
		}
	case "int", "uint16":
		if _, err := strconv.Atoi(str); err != nil {
			return fmt.Errorf("%q is not an integer", str)
		}
	case "float":
		if _, err := strconv.ParseFloat(str, 64); err != nil {
			return fmt.Errorf("%q is not a number", str)
		}
	case "string":
		if _, ok := v.(string); !ok {
			return fmt.Errorf("%v is a %T, want a string (quote it)", v, v)
		}
	case "strings":
		switch x := v.(type) {
		case string:
		case []any:
			for _, e := range x {
				if _, ok := e.(string); !ok {
					return fmt.Errorf("list item %v is a %T, want a string (quote it)", e, e)
				}
			}
		default:
			return fmt.Errorf("%v is a %T, want a list of strings", v, v)
		}
	default:
		return fmt.Errorf("flag type %q is not known to this test", typ)
	}
	return nil
}

// suggest names the closest known flag to a typo.
func suggest(name string, flags map[string]string) string {
	best, bestD := "", 4
	for f := range flags {
		if d := editDistance(name, f); d < bestD {
			best, bestD = f, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sortStrings(out)
	return out
}
