// kubecheck decodes rendered Kubernetes manifests strictly against the API types of client-go
// (the version helm itself is built with), so that a misspelt or misplaced field in the chart's
// templates fails scripts/helm-check instead of being dropped by the API server. helm lint does
// not look at fields, and `helm template --validate` needs a cluster.
//
//	kubecheck FILE...   # multi-document YAML, as `helm template` prints it
//
// Kinds outside client-go's scheme (ServiceMonitor, ScaledObject) are only checked for
// apiVersion, kind and metadata.name. It prints one line per object and exits 1 on any error.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"
)

// The custom resources the chart renders, whose types are not in client-go.
var custom = map[schema.GroupVersionKind]bool{
	{Group: "monitoring.coreos.com", Version: "v1", Kind: "ServiceMonitor"}: true,
	{Group: "keda.sh", Version: "v1alpha1", Kind: "ScaledObject"}:           true,
}

func main() {
	strict := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
		json.SerializerOptions{Yaml: true, Strict: true})
	failed := false
	for _, path := range os.Args[1:] {
		if err := checkFile(path, strict); err != nil {
			fmt.Fprintf(os.Stderr, "kubecheck: %s: %v\n", path, err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}

func checkFile(path string, strict runtime.Decoder) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var errs []error
	n := 0
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		n++
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			errs = append(errs, fmt.Errorf("document %d: %w", n, err))
			continue
		}
		gvk := schema.FromAPIVersionAndKind(meta.APIVersion, meta.Kind)
		what := fmt.Sprintf("%s %s", meta.Kind, meta.Metadata.Name)
		switch {
		case meta.Metadata.Name == "":
			errs = append(errs, fmt.Errorf("%s: no metadata.name", what))
		case custom[gvk]:
			fmt.Printf("kubecheck: %s (%s): custom resource, fields not checked\n", what, meta.APIVersion)
		case !scheme.Scheme.Recognizes(gvk):
			errs = append(errs, fmt.Errorf("%s: unknown apiVersion/kind %s", what, gvk))
		default:
			if _, _, err := strict.Decode(doc, nil, nil); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", what, err))
			} else {
				fmt.Printf("kubecheck: %s (%s): ok\n", what, meta.APIVersion)
			}
		}
	}
	return errors.Join(errs...)
}

// stripComments drops YAML comment lines, so a document of comments alone counts as empty.
func stripComments(doc []byte) []byte {
	var out bytes.Buffer
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out.Write(line)
			out.WriteByte('\n')
		}
	}
	return out.Bytes()
}
