package convert

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// Stream converts a stream of YAML or JSON documents and writes vmpod's YAML to out, one
// document per object. Objects that are not KubeVirt's or CDI's (a cloud-init Secret next
// to a VM, say) pass through unchanged; a KubeVirt kind with no vmpod equivalent is an
// error. Warnings go to warn, prefixed by the object. All errors are collected before
// failing, and nothing is written unless everything converted.
func Stream(in io.Reader, out, warn io.Writer) error {
	dec := utilyaml.NewYAMLOrJSONDecoder(in, 4096)
	var docs [][]byte
	var errs []error
	for i := 0; ; i++ {
		var obj map[string]any
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return fmt.Errorf("document %d: %w", i, err)
		}
		if len(obj) == 0 {
			continue
		}
		res, err := Object(obj)
		var doc any = obj
		switch {
		case errors.Is(err, ErrNotKubeVirt):
		case err != nil:
			errs = append(errs, err)
			continue
		default:
			for _, w := range res.Warnings {
				fmt.Fprintf(warn, "Warning: %s %s: %s\n", res.Object.GetObjectKind().GroupVersionKind().Kind, res.Object.GetName(), w)
			}
			if doc, err = clean(res.Object); err != nil {
				return err
			}
		}
		b, err := yaml.Marshal(doc)
		if err != nil {
			return fmt.Errorf("document %d: %w", i, err)
		}
		docs = append(docs, b)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for i, d := range docs {
		if i > 0 {
			if _, err := io.WriteString(out, "---\n"); err != nil {
				return err
			}
		}
		if _, err := out.Write(d); err != nil {
			return err
		}
	}
	return nil
}

// clean drops what a new manifest should not carry: an empty status, a null
// creationTimestamp.
func clean(o any) (map[string]any, error) {
	b, err := json.Marshal(o)
	if err != nil {
		return nil, fmt.Errorf("marshal: %w", err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("unmarshal: %w", err)
	}
	delete(m, "status")
	if meta, ok := m["metadata"].(map[string]any); ok {
		delete(meta, "creationTimestamp")
	}
	return m, nil
}
