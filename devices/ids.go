package devices

import "fmt"

// idSpace checks that ids are unique within each of QEMU's namespaces.
type idSpace map[string]map[string]string // namespace → id → owner

func newIDSpace() idSpace { return idSpace{} }

func (s idSpace) reserve(namespace string, ids ...string) {
	for _, id := range ids {
		s.claim(namespace, id, "the machine")
	}
}

func (s idSpace) claim(namespace, id, owner string) error {
	if s[namespace] == nil {
		s[namespace] = map[string]string{}
	}
	if prev, ok := s[namespace][id]; ok {
		return fmt.Errorf("devices: %s id %q of %s is already used by %s", namespace, id, owner, prev)
	}
	s[namespace][id] = owner
	return nil
}

func (s idSpace) add(owner string, spec Spec) error {
	var claims [][2]string
	for _, io := range spec.IOThreads {
		claims = append(claims, [2]string{"object", io.ID})
	}
	for _, m := range spec.Memory {
		claims = append(claims, [2]string{"object", m.ID})
	}
	for _, c := range spec.Chardevs {
		claims = append(claims, [2]string{"chardev", c.ID})
	}
	for _, f := range spec.Fsdevs {
		claims = append(claims, [2]string{"fsdev", f.ID})
	}
	for _, b := range spec.Blockdevs {
		claims = append(claims, [2]string{"block node", b.NodeName})
	}
	for _, t := range spec.Taps {
		claims = append(claims, [2]string{"netdev", t.ID})
	}
	for _, f := range spec.Frontends {
		claims = append(claims, [2]string{"device", f.ID})
	}
	for _, c := range claims {
		if err := s.claim(c[0], c[1], fmt.Sprintf("device %q", owner)); err != nil {
			return err
		}
	}
	return nil
}
