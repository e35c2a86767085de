// Package k8s_test checks the Kubernetes manifests in deploy/k8s: every file
// decodes strictly into the Kubernetes API types (an unknown or misspelt
// field is an error, as the API server's strict field validation makes it),
// every kustomization lists files that exist and leaves none out, and what
// the manifests ask of the tether binary (flags, config keys, environment
// variables, probe ports, mounts, capabilities) agrees with the binary built
// from this tree.
//
// The kustomize build is done here, by a small builder that understands only
// what these kustomizations use (resources, namespace, strategic-merge
// patches) and refuses anything else, so that the check needs neither the
// network nor a kustomize binary; when kubectl is installed its built-in
// kustomize must produce the same objects.
package k8s_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"sigs.k8s.io/yaml"
)

// scheme knows every API type the manifests may use; a kind outside it is
// an error rather than an object that escapes the checks.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme} {
		if err := add(s); err != nil {
			panic(err)
		}
	}
	return s
}()

// strictYAML decodes YAML into the typed object its apiVersion and kind
// name, failing on unknown fields, duplicate fields and a case mismatch
// (hostnetwork is not hostNetwork), like kubectl apply --validate=strict.
var strictYAML = kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme, scheme,
	kjson.SerializerOptions{Yaml: true, Strict: true})

// decodeStrict decodes one YAML document. source names it in errors.
func decodeStrict(doc []byte, source string) (runtime.Object, error) {
	obj, gvk, err := strictYAML.Decode(doc, nil, nil)
	if err != nil {
		// A strict-decoding error still returns the object: it is an error all the same.
		what := "?"
		if gvk != nil {
			what = gvk.Kind
		}
		return nil, fmt.Errorf("%s: %s does not decode strictly: %w", source, what, err)
	}
	return obj, nil
}

// splitDocuments splits a multi-document YAML file on its "---" lines and
// drops documents that hold only comments.
func splitDocuments(data []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	flush := func() {
		meaningful := false
		for _, line := range strings.Split(cur.String(), "\n") {
			t := strings.TrimSpace(line)
			if t != "" && !strings.HasPrefix(t, "#") {
				meaningful = true
				break
			}
		}
		if meaningful {
			docs = append(docs, bytes.Clone(cur.Bytes()))
		}
		cur.Reset()
	}
	for _, line := range strings.SplitAfter(string(data), "\n") {
		if strings.TrimRight(line, " \r\n") == "---" {
			flush()
			continue
		}
		cur.WriteString(line)
	}
	flush()
	return docs
}

// kustomization is the subset of kustomize.config.k8s.io/v1beta1 this
// builder implements. Decoding is strict: a field outside it (images,
// configMapGenerator, commonLabels, ...) is an error here, never silently
// ignored.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace,omitempty"`
	Resources  []string `json:"resources,omitempty"`
	Patches    []struct {
		Path string `json:"path"`
	} `json:"patches,omitempty"`
}

// object is one built manifest with where it came from.
type object struct {
	obj    runtime.Object
	source string
}

func objectKey(o runtime.Object) string {
	gvk := o.GetObjectKind().GroupVersionKind()
	m := o.(interface {
		GetName() string
		GetNamespace() string
	})
	return fmt.Sprintf("%s/%s %s/%s", gvk.GroupVersion(), gvk.Kind, m.GetNamespace(), m.GetName())
}

// build renders the kustomization in dir the way kustomize does for the
// fields kustomization supports: resources (files and directories, in
// order), strategic-merge patches matched by apiVersion, kind and name, and
// the namespace set on every namespaced object.
func build(dir string) ([]object, error) {
	kpath := filepath.Join(dir, "kustomization.yaml")
	data, err := os.ReadFile(kpath)
	if err != nil {
		return nil, err
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		return nil, fmt.Errorf("%s: %w", kpath, err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		return nil, fmt.Errorf("%s: apiVersion/kind %q/%q, want kustomize.config.k8s.io/v1beta1/Kustomization", kpath, k.APIVersion, k.Kind)
	}
	var out []object
	for _, r := range k.Resources {
		p := filepath.Join(dir, r)
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("%s lists resource %q: %w", kpath, r, err)
		}
		if st.IsDir() {
			sub, err := build(p)
			if err != nil {
				return nil, err
			}
			out = append(out, sub...)
			continue
		}
		objs, err := decodeFile(p)
		if err != nil {
			return nil, err
		}
		out = append(out, objs...)
	}
	for _, patch := range k.Patches {
		if err := applyPatch(out, filepath.Join(dir, patch.Path)); err != nil {
			return nil, fmt.Errorf("%s: patch %s: %w", kpath, patch.Path, err)
		}
	}
	if k.Namespace != "" {
		for _, o := range out {
			if _, isNS := o.obj.(*corev1.Namespace); isNS {
				continue
			}
			o.obj.(interface{ SetNamespace(string) }).SetNamespace(k.Namespace)
		}
	}
	seen := map[string]string{}
	for _, o := range out {
		key := objectKey(o.obj)
		if prev, dup := seen[key]; dup {
			return nil, fmt.Errorf("%s: %s is defined twice (%s and %s)", kpath, key, prev, o.source)
		}
		seen[key] = o.source
	}
	return out, nil
}

func decodeFile(path string) ([]object, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []object
	for i, doc := range splitDocuments(data) {
		src := fmt.Sprintf("%s (document %d)", path, i+1)
		obj, err := decodeStrict(doc, src)
		if err != nil {
			return nil, err
		}
		out = append(out, object{obj: obj, source: src})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s holds no manifest", path)
	}
	return out, nil
}

// applyPatch applies the strategic-merge patch in path to the object it
// names. The patch itself must decode strictly, so a typo in a patch fails
// as it would in a resource.
func applyPatch(objs []object, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	patchObj, err := decodeStrict(data, path)
	if err != nil {
		return err
	}
	patchJSON, err := yaml.YAMLToJSON(data)
	if err != nil {
		return err
	}
	pkey := objectKey(patchObj)
	pmeta := patchObj.(interface {
		GetName() string
		GetNamespace() string
	})
	for i, o := range objs {
		m := o.obj.(interface {
			GetName() string
			GetNamespace() string
		})
		if o.obj.GetObjectKind().GroupVersionKind() != patchObj.GetObjectKind().GroupVersionKind() ||
			m.GetName() != pmeta.GetName() ||
			(pmeta.GetNamespace() != "" && m.GetNamespace() != "" && m.GetNamespace() != pmeta.GetNamespace()) {
			continue
		}
		orig, err := json.Marshal(o.obj)
		if err != nil {
			return err
		}
		merged, err := strategicpatch.StrategicMergePatch(orig, patchJSON, o.obj)
		if err != nil {
			return fmt.Errorf("merge into %s: %w", pkey, err)
		}
		obj, err := decodeStrict(merged, path+" applied to "+o.source)
		if err != nil {
			return err
		}
		objs[i] = object{obj: obj, source: o.source + " + " + path}
		return nil
	}
	return fmt.Errorf("no resource matches %s", pkey)
}

// yamlFilesIn lists the .yaml files directly in dir.
func yamlFilesIn(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() && (strings.HasSuffix(e.Name(), ".yaml") || strings.HasSuffix(e.Name(), ".yml")) {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out, nil
}

// unreferencedFiles returns the YAML files of dir that its kustomization
// neither lists as a resource nor as a patch: a manifest nobody applies is
// a manifest that rots.
func unreferencedFiles(dir string) ([]string, error) {
	data, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		return nil, err
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		return nil, err
	}
	used := map[string]bool{"kustomization.yaml": true}
	for _, r := range k.Resources {
		used[filepath.Clean(r)] = true
	}
	for _, p := range k.Patches {
		used[filepath.Clean(p.Path)] = true
	}
	files, err := yamlFilesIn(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, f := range files {
		if !used[f] {
			out = append(out, f)
		}
	}
	return out, nil
}
