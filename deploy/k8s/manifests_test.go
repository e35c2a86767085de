package k8s_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func sortStrings(s []string) { sort.Strings(s) }

// builds are the kustomizations an operator may apply.
var builds = []string{"base", "overlays/production", "overlays/tls", "overlays/listeners"}

// tetherHelp is filled by TestMain: the flags of every daemon, read from the
// --help of the binary built from this tree.
var tetherHelp roleFlags

func TestMain(m *testing.M) {
	code, err := runWithBinary(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(code)
}

func runWithBinary(m *testing.M) (int, error) {
	dir, err := os.MkdirTemp("", "tether-k8s-test-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "tether")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/tether")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("build tether: %v\n%s", err, out)
	}
	tetherHelp = roleFlags{}
	for _, role := range []string{"ps", "agent", "redirector", "proxy"} {
		out, err := exec.CommandContext(ctx, bin, role, "--help").CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("tether %s --help: %v\n%s", role, err, out)
		}
		flags := parseHelpFlags(string(out))
		if len(flags) < 5 || flags["config"] != "string" || flags["metrics"] != "string" {
			return 0, fmt.Errorf("tether %s --help: parsed only %v; the help format changed", role, keys(flags))
		}
		tetherHelp[role] = flags
	}
	return m.Run(), nil
}

func secretsDoc(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func mustBuild(t *testing.T, dir string) []object {
	t.Helper()
	objs, err := build(dir)
	if err != nil {
		t.Fatalf("build %s: %v", dir, err)
	}
	return objs
}

// TestEveryManifestDecodesStrictly decodes every YAML file under deploy/k8s
// (resources and patches) into the API types, and checks that each
// kustomization lists only files that exist and leaves no file out.
func TestEveryManifestDecodesStrictly(t *testing.T) {
	decoded := 0
	err := filepath.WalkDir(".", func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".yaml") || d.Name() == "kustomization.yaml" {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for i, doc := range splitDocuments(data) {
			if _, err := decodeStrict(doc, fmt.Sprintf("%s (document %d)", p, i+1)); err != nil {
				t.Error(err)
			}
			decoded++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if decoded < 10 {
		t.Fatalf("decoded only %d manifests under deploy/k8s", decoded)
	}
	for _, dir := range builds {
		left, err := unreferencedFiles(dir)
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		if len(left) > 0 {
			t.Errorf("%s/kustomization.yaml does not list %v", dir, left)
		}
		objs := mustBuild(t, dir)
		t.Logf("%s: %d objects", dir, len(objs))
	}
	t.Logf("%d manifests decoded strictly", decoded)
}

// TestManifestsAgreeWithTheBinary runs every consistency rule over every
// build: flags, config keys and TETHER_* variables the binary knows, probes on
// the --metrics port, mounts backed by volumes, capabilities by name, one
// image, Services that reach their pods.
func TestManifestsAgreeWithTheBinary(t *testing.T) {
	docs := secretsDoc(t)
	for _, dir := range builds {
		t.Run(strings.ReplaceAll(dir, "/", "_"), func(t *testing.T) {
			c := &checker{build: dir, objs: mustBuild(t, dir), flags: tetherHelp, secrets: docs}
			for _, err := range c.check() {
				t.Error(err)
			}
			roles := map[string]bool{}
			for _, w := range c.workloads() {
				for _, ctr := range w.spec.Spec.Containers {
					roles[ctr.Args[0]] = true
				}
			}
			for _, want := range []string{"ps", "agent", "redirector"} {
				if !roles[want] {
					t.Errorf("%s deploys no %s", dir, want)
				}
			}
		})
	}
}

// TestOverlaysChangeWhatTheySay: the builder really applied the patches
// (a builder that ignored them would pass every other check).
func TestOverlaysChangeWhatTheySay(t *testing.T) {
	ps := func(objs []object) *appsv1.StatefulSet {
		for _, o := range objs {
			if s, ok := o.obj.(*appsv1.StatefulSet); ok && s.Name == "tether-ps" {
				return s
			}
		}
		t.Fatal("no StatefulSet tether-ps")
		return nil
	}
	base, prod, tls := ps(mustBuild(t, "base")), ps(mustBuild(t, "overlays/production")), ps(mustBuild(t, "overlays/tls"))
	if *base.Spec.Replicas != 2 || *prod.Spec.Replicas != 3 || *tls.Spec.Replicas != 3 {
		t.Errorf("replicas base/production/tls = %d/%d/%d, want 2/3/3", *base.Spec.Replicas, *prod.Spec.Replicas, *tls.Spec.Replicas)
	}
	if prod.Spec.Template.Spec.Containers[0].Resources.Limits.Memory().IsZero() {
		t.Error("production sets no memory limit on the PS")
	}
	if len(prod.Spec.Template.Spec.Containers[0].Args) != len(base.Spec.Template.Spec.Containers[0].Args) {
		t.Error("the production patch replaced the PS args")
	}
	env := map[string]bool{}
	for _, e := range tls.Spec.Template.Spec.Containers[0].Env {
		env[e.Name] = true
	}
	if !env["TETHER_TLS_CERT"] || !env["POD_IP"] {
		t.Errorf("tls overlay: PS env %v, want the base's POD_IP merged with TETHER_TLS_CERT", keys(env))
	}
	if tls.Namespace != "tether" {
		t.Errorf("namespace %q, want tether", tls.Namespace)
	}
	// overlays/listeners takes back the capabilities and root of the base.
	listeners := ps(mustBuild(t, "overlays/listeners"))
	bsc, lsc := base.Spec.Template.Spec.Containers[0].SecurityContext, listeners.Spec.Template.Spec.Containers[0].SecurityContext
	if len(bsc.Capabilities.Add) != 2 || *bsc.RunAsUser != 0 {
		t.Errorf("base PS: capabilities %v as uid %d, want BPF and NET_ADMIN as uid 0", bsc.Capabilities.Add, *bsc.RunAsUser)
	}
	if len(lsc.Capabilities.Add) != 0 || *lsc.RunAsUser == 0 || !*lsc.RunAsNonRoot {
		t.Errorf("listeners overlay PS: capabilities %v as uid %d, want none as a non-root uid", lsc.Capabilities.Add, *lsc.RunAsUser)
	}
	if *listeners.Spec.Replicas != 3 {
		t.Errorf("listeners overlay: %d replicas, want production's 3", *listeners.Spec.Replicas)
	}
}

// TestStrictDecodingRejectsMistakes shows the decoding can fail: a misspelt
// field, a field in the wrong case, a duplicate field, a wrong type and an
// unknown kind are each an error, while the same manifest spelt right decodes.
func TestStrictDecodingRejectsMistakes(t *testing.T) {
	good := `apiVersion: apps/v1
kind: DaemonSet
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      hostNetwork: true
      containers: [{name: c, image: i}]
`
	if _, err := decodeStrict([]byte(good), "good"); err != nil {
		t.Fatalf("a correct manifest fails: %v", err)
	}
	for name, bad := range map[string]string{
		"misspelt field": strings.Replace(good, "hostNetwork: true", "hostNetwrk: true", 1),
		"wrong case":     strings.Replace(good, "hostNetwork: true", "hostnetwork: true", 1),
		"duplicate":      strings.Replace(good, "hostNetwork: true", "hostNetwork: true\n      hostNetwork: false", 1),
		"wrong type":     strings.Replace(good, "hostNetwork: true", "hostNetwork: [yes]", 1),
		"unknown kind":   strings.Replace(good, "kind: DaemonSet", "kind: DaemonSat", 1),
		"nested typo":    strings.Replace(good, "image: i}", "image: i, imagePullPolicy: Always, readinesProbe: {}}", 1),
	} {
		if _, err := decodeStrict([]byte(bad), name); err == nil {
			t.Errorf("%s: decoded without error:\n%s", name, bad)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}

	// The same through the builder: a typo in a patch fails the build.
	dir := t.TempDir()
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("kustomization.yaml", "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [ds.yaml]\npatches: [{path: patch.yaml}]\n")
	write("ds.yaml", good)
	write("patch.yaml", "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      hostNetwrk: false\n")
	if _, err := build(dir); err == nil || !strings.Contains(err.Error(), "hostNetwrk") {
		t.Errorf("a patch with hostNetwrk built, err = %v", err)
	}
	write("kustomization.yaml", "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [ds.yaml, missing.yaml]\n")
	if _, err := build(dir); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Errorf("a kustomization listing a missing file built, err = %v", err)
	}
	write("kustomization.yaml", "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [ds.yaml]\ncommonLabels: {a: b}\n")
	if _, err := build(dir); err == nil || !strings.Contains(err.Error(), "commonLabels") {
		t.Errorf("a kustomization field the builder does not implement was ignored, err = %v", err)
	}
}

// TestConsistencyRulesCatchMistakes breaks the real base build one way at a
// time and requires the checker to name each mistake: every rule above can
// fail.
func TestConsistencyRulesCatchMistakes(t *testing.T) {
	docs := secretsDoc(t)
	container := func(objs []object, workload string) (*corev1.PodSpec, *corev1.Container) {
		for _, o := range objs {
			switch w := o.obj.(type) {
			case *appsv1.DaemonSet:
				if w.Name == workload {
					return &w.Spec.Template.Spec, &w.Spec.Template.Spec.Containers[0]
				}
			case *appsv1.StatefulSet:
				if w.Name == workload {
					return &w.Spec.Template.Spec, &w.Spec.Template.Spec.Containers[0]
				}
			}
		}
		t.Fatalf("no workload %s", workload)
		return nil, nil
	}
	cases := []struct {
		name   string
		break_ func(objs []object)
		want   string
	}{
		{"unknown flag", func(o []object) {
			_, c := container(o, "tether-agent")
			c.Args = append(c.Args, "--tunnel=2")
		}, `--tunnel is not a flag of "tether agent" (did you mean "tunnels"?)`},
		{"flag of another role", func(o []object) {
			_, c := container(o, "tether-agent")
			c.Args = append(c.Args, "--advertise=1.2.3.4")
		}, `--advertise is not a flag of "tether agent"`},
		{"config key typo", func(o []object) {
			for _, x := range o {
				if cm, ok := x.obj.(*corev1.ConfigMap); ok && cm.Name == "tether-redirector-config" {
					cm.Data["redirector.yaml"] += "kernel-grase: 1m\n"
				}
			}
		}, `has key "kernel-grase", which is not a flag of "tether redirector" (did you mean "kernel-grace"?)`},
		{"config key missing from the ConfigMap", func(o []object) {
			_, c := container(o, "tether-ps")
			c.Args[1] = "--config=/etc/tether/config/pss.yaml"
		}, `has no key "pss.yaml"`},
		{"config value of the wrong type", func(o []object) {
			for _, x := range o {
				if cm, ok := x.obj.(*corev1.ConfigMap); ok && cm.Name == "tether-ps-config" {
					cm.Data["ps.yaml"] = strings.Replace(cm.Data["ps.yaml"], "lease: 5s", "lease: 5", 1)
				}
			}
		}, `key "lease": "5" is not a duration`},
		{"unknown TETHER_ variable", func(o []object) {
			_, c := container(o, "tether-ps")
			c.Env = append(c.Env, corev1.EnvVar{Name: "TETHER_TLS_CRT", Value: "/x"})
		}, `env TETHER_TLS_CRT stands for --tls-crt`},
		{"undefined $(VAR)", func(o []object) {
			_, c := container(o, "tether-agent")
			c.Args = append(c.Args, "--stream-window=$(WINDOW)")
		}, `refers to $(WINDOW)`},
		{"probe on another port", func(o []object) {
			_, c := container(o, "tether-redirector")
			c.ReadinessProbe.HTTPGet.Port = intstr.FromInt32(9999)
		}, `readinessProbe probes port 9999 but --metrics`},
		{"liveness on /readyz", func(o []object) {
			_, c := container(o, "tether-ps")
			c.LivenessProbe.HTTPGet.Path = "/readyz"
		}, `livenessProbe path "/readyz", want "/healthz"`},
		{"metrics on loopback", func(o []object) {
			_, c := container(o, "tether-ps")
			c.Args[4] = "--metrics=127.0.0.1:9101"
		}, `listens on loopback`},
		{"mount without volume", func(o []object) {
			s, c := container(o, "tether-redirector")
			s.Volumes = s.Volumes[:len(s.Volumes)-1]
			_ = c
		}, `volumeMount "cgroup2" (/host/sys/fs/cgroup) names no volume`},
		{"nested mount", func(o []object) {
			_, c := container(o, "tether-ps")
			c.VolumeMounts[1].MountPath = "/etc/tether/config/secrets"
		}, `nested inside /etc/tether/config`},
		{"capability typo", func(o []object) {
			_, c := container(o, "tether-redirector")
			c.SecurityContext.Capabilities.Add = append(c.SecurityContext.Capabilities.Add, "NET_ADMN")
		}, `capability "NET_ADMN" is not a Linux capability`},
		{"redirector without CAP_PERFMON", func(o []object) {
			_, c := container(o, "tether-redirector")
			c.SecurityContext.Capabilities.Add = []corev1.Capability{"BPF", "NET_ADMIN"}
		}, `needs CAP_PERFMON`},
		{"privileged", func(o []object) {
			_, c := container(o, "tether-redirector")
			yes := true
			c.SecurityContext.Privileged = &yes
		}, `privileged: name the capabilities`},
		{"redirector under the default seccomp profile", func(o []object) {
			_, c := container(o, "tether-redirector")
			c.SecurityContext.SeccompProfile.Type = corev1.SeccompProfileTypeRuntimeDefault
		}, `refuses bpf(2) without CAP_SYS_ADMIN`},
		{"agent as root", func(o []object) {
			s, _ := container(o, "tether-agent")
			no := false
			s.SecurityContext.RunAsNonRoot = &no
		}, `agent needs no root`},
		{"PS with a capability beyond sk_lookup's", func(o []object) {
			_, c := container(o, "tether-ps")
			c.SecurityContext.Capabilities.Add = append(c.SecurityContext.Capabilities.Add, "NET_BIND_SERVICE")
		}, `needs CAP_BPF and CAP_NET_ADMIN only, adds NET_BIND_SERVICE`},
		{"sk_lookup PS without CAP_NET_ADMIN", func(o []object) {
			_, c := container(o, "tether-ps")
			c.SecurityContext.Capabilities.Add = []corev1.Capability{"BPF"}
		}, `needs CAP_NET_ADMIN`},
		{"sk_lookup PS as non-root", func(o []object) {
			_, c := container(o, "tether-ps")
			uid, yes := int64(65532), true
			c.SecurityContext.RunAsUser, c.SecurityContext.RunAsNonRoot = &uid, &yes
		}, `no ambient capabilities`},
		{"sk_lookup PS under the default seccomp profile", func(o []object) {
			_, c := container(o, "tether-ps")
			c.SecurityContext.SeccompProfile.Type = corev1.SeccompProfileTypeRuntimeDefault
		}, `the ps needs Unconfined`},
		{"listeners PS with capabilities", func(o []object) {
			_, c := container(o, "tether-ps")
			c.Env = append(c.Env, corev1.EnvVar{Name: "TETHER_DATA_PLANE", Value: "listeners"})
		}, `ps needs no capability, adds [BPF NET_ADMIN]`},
		{"second image", func(o []object) {
			_, c := container(o, "tether-agent")
			c.Image = "ghcr.io/tether-net/tether:0.0.9"
		}, `use 2 images`},
		{"cgroup root", func(o []object) {
			for _, x := range o {
				if cm, ok := x.obj.(*corev1.ConfigMap); ok && cm.Name == "tether-redirector-config" {
					cm.Data["redirector.yaml"] = strings.Replace(cm.Data["redirector.yaml"], "/host/sys/fs/cgroup/tether-clients.slice", "/host/sys/fs/cgroup", 1)
				}
			}
		}, `is the root of the cgroup2 mount`},
		{"host DNS for a Service name", func(o []object) {
			s, _ := container(o, "tether-agent")
			s.DNSPolicy = corev1.DNSClusterFirst
		}, `resolves it only with dnsPolicy ClusterFirstWithHostNet`},
		{"grace shorter than the drain", func(o []object) {
			s, _ := container(o, "tether-ps")
			g := int64(10)
			s.TerminationGracePeriodSeconds = &g
		}, `does not exceed --drain-timeout 15s`},
		{"agent IP not the node's", func(o []object) {
			_, c := container(o, "tether-agent")
			c.Args[3] = "--ip=$(NODE_NAME)"
		}, `should be the node IP`},
		{"server Service that does not exist", func(o []object) {
			for _, x := range o {
				if cm, ok := x.obj.(*corev1.ConfigMap); ok && cm.Name == "tether-agent-config" {
					cm.Data["agent.yaml"] = strings.Replace(cm.Data["agent.yaml"], "tether-ps.tether", "tether-pss.tether", 1)
				}
			}
		}, `names Service tether/tether-pss`},
		{"undocumented Secret", func(o []object) {
			_, c := container(o, "tether-agent")
			for i := range c.Env {
				if c.Env[i].Name == "TETHER_TOKEN" {
					c.Env[i].ValueFrom.SecretKeyRef.Key = "agent-token"
				}
			}
		}, `reads key "agent-token" of Secret "tether-agent-token"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			objs := mustBuild(t, "base")
			clean := (&checker{build: "base", objs: objs, flags: tetherHelp, secrets: docs}).check()
			if len(clean) > 0 {
				t.Fatalf("the base build is not clean to start with: %v", clean)
			}
			objs = mustBuild(t, "base")
			tc.break_(objs)
			errs := (&checker{build: "base", objs: objs, flags: tetherHelp, secrets: docs}).check()
			for _, err := range errs {
				if strings.Contains(err.Error(), tc.want) {
					t.Logf("caught: %v", err)
					return
				}
			}
			t.Errorf("mistake not caught: want an error containing %q, got %v", tc.want, errs)
		})
	}
}
